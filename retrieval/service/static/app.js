// The search page: pick or drop a photo, POST it to /search, show the results; clicking a
// result searches with that item (GET /items/{id}/similar). No external assets.
"use strict";

const $ = (id) => document.getElementById(id);
let limits = { max_body_bytes: Infinity };

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => `${d.loc.join(".")}: ${d.msg}`).join("; ");
  } catch (_) { /* not JSON */ }
  return `the server answered ${response.status} ${response.statusText}`;
}

function options() {
  const params = new URLSearchParams({ k: $("k").value });
  const label = $("label").value.trim();
  if (label) params.set("label", label);
  return params;
}

function render(body) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of body.results) {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "result";
    card.dataset.id = hit.id;
    card.title = `${hit.name} (id ${hit.id}): search with this image`;
    const img = document.createElement("img");
    img.src = hit.thumbnail;
    img.alt = hit.label ? `${hit.label}: ${hit.name}` : hit.name;
    img.loading = "lazy";
    const meta = document.createElement("div");
    meta.className = "meta";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = hit.label ?? "";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    meta.append(label, score);
    card.append(img, meta);
    card.addEventListener("click", () => searchItem(hit));
    grid.append(card);
  }
  $("status").textContent = body.results.length
    ? `${body.results.length} results in ${Math.round(body.took_ms)} ms`
    : "No results (is a label filter set?)";
}

async function run(request) {
  showMessage("");
  $("status").textContent = "Searching…";
  try {
    const response = await request();
    if (!response.ok) {
      showMessage(await errorText(response));
      $("status").textContent = "";
      return;
    }
    render(await response.json());
  } catch (err) {
    showMessage(`The server cannot be reached (${err.message}).`);
    $("status").textContent = "";
  }
}

function preview(src) {
  $("preview").src = src;
  $("preview").hidden = false;
  $("drop-text").hidden = true;
}

function searchFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/") && file.type !== "") {
    showMessage(`${file.name} is not an image.`);
    return;
  }
  if (file.size > limits.max_body_bytes) {
    showMessage(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB; the limit is ${(limits.max_body_bytes / 1048576).toFixed(1)} MB.`);
    return;
  }
  preview(URL.createObjectURL(file));
  const form = new FormData();
  form.append("image", file, file.name);
  run(() => fetch(`/search?${options()}`, { method: "POST", body: form }));
}

function searchItem(hit) {
  preview(hit.thumbnail);
  run(() => fetch(`/items/${hit.id}/similar?${options()}`));
}

function setUp() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (e) => searchFile(e.target.files[0]));
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file-input").click(); }
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.remove("dragging"); });
  }
  zone.addEventListener("drop", (e) => {
    const files = e.dataTransfer ? e.dataTransfer.files : [];
    if (files.length !== 1) { showMessage("Drop one image file."); return; }
    searchFile(files[0]);
  });
  // A file dropped outside the zone must not replace the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  fetch("/stats").then((r) => r.json()).then((s) => {
    limits = s.limits;
    $("about").textContent = `${s.items.toLocaleString()} images · ${s.backbone ?? "model"} · ${s.dim}-d · index ${s.index.factory}`;
  }).catch(() => { $("about").textContent = "Statistics unavailable."; });
}

setUp();
