// The search page: pick or drop a photo, POST it to /search, show the results; clicking a
// result's picture searches with that item (GET /items/{id}/similar, the item itself left
// out), its "full image" link opens /items/{id}/image, and "More results" asks for the next
// page of the same ranking (offset) up to the server's max_k. "Find duplicates" lists the
// groups of exact and near copies (GET /duplicates), the copy to keep first, page by page.
// No external assets.
"use strict";

const $ = (id) => document.getElementById(id);
let limits = { max_body_bytes: Infinity, max_k: 100 };
// The search on screen: fetch(offset, k) gives its next page; shown counts the results.
let current = null;
let groupsNext = null; // the offset of the next page of duplicate groups, or null

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

function options(offset, k) {
  const params = new URLSearchParams({ k: String(k), offset: String(offset) });
  const label = $("label").value.trim();
  if (label) params.set("label", label);
  return params;
}

function pageSize() {
  return Number($("k").value);
}

function card(hit) {
  const box = document.createElement("div");
  box.className = "result";
  box.dataset.id = hit.id;
  const pick = document.createElement("button");
  pick.type = "button";
  pick.className = "pick";
  pick.title = `${hit.name} (id ${hit.id}): search with this image`;
  const img = document.createElement("img");
  img.src = hit.thumbnail;
  img.alt = hit.label ? `${hit.label}: ${hit.name}` : hit.name;
  img.loading = "lazy";
  pick.append(img);
  pick.addEventListener("click", () => searchItem(hit));
  const meta = document.createElement("div");
  meta.className = "meta";
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = hit.label ?? "";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  meta.append(label, score);
  const file = document.createElement("div");
  file.className = "file";
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = hit.name;
  name.title = hit.name;
  const open = document.createElement("a");
  open.className = "open";
  open.href = hit.image;
  open.target = "_blank";
  open.rel = "noopener";
  open.textContent = "full image";
  open.title = `open ${hit.name} at full size`;
  file.append(name, open);
  box.append(pick, meta, file);
  return box;
}

function clearResults() {
  $("results").replaceChildren();
  $("more").hidden = true;
  $("status").textContent = "";
  current = null;
}

function clearQuery() {
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  $("drop-text").hidden = false;
  $("query-item").hidden = true;
}

// A failed new search: its error, and nothing left over from the search before it.
function fail(text) {
  clearResults();
  clearQuery();
  showMessage(text);
}

function show(body, append) {
  const grid = $("results");
  if (!append) grid.replaceChildren();
  grid.append(...body.results.map(card));
  current.shown = grid.children.length;
  current.next = body.next_offset;
  $("more").hidden = body.next_offset === null;
  $("status").textContent = current.shown
    ? `${current.shown} results, ${Math.round(body.took_ms)} ms${current.about}`
    : "No results (is a label filter set?)";
}

async function fetchPage(search, offset, k) {
  try {
    const response = await search.fetch(offset, k);
    if (!response.ok) return { error: await errorText(response) };
    return { body: await response.json() };
  } catch (err) {
    return { error: `The server cannot be reached (${err.message}).` };
  }
}

function hideGroups() {
  $("groups").hidden = true;
  $("groups").replaceChildren();
  $("more-groups").hidden = true;
  groupsNext = null;
}

function copyCard(copy) {
  const box = document.createElement("div");
  box.className = `copy ${copy.keep ? "keep" : ""} ${copy.kind}`;
  box.dataset.id = copy.id;
  const img = document.createElement("img");
  img.src = copy.thumbnail;
  img.alt = copy.name;
  img.loading = "lazy";
  const head = document.createElement("p");
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.textContent = copy.keep ? "keep" : copy.kind;
  head.append(badge, ` ${copy.score.toFixed(3)}`);
  const name = document.createElement("p");
  name.textContent = copy.name;
  name.title = copy.name;
  const size = document.createElement("p");
  const kb = copy.bytes === null ? "?" : `${Math.round(copy.bytes / 1000)} KB`;
  size.textContent = `${copy.width ?? "?"}×${copy.height ?? "?"} · ${kb}`;
  box.append(img, head, name, size);
  return box;
}

function groupBox(group, number) {
  const box = document.createElement("section");
  box.className = "group";
  const title = document.createElement("h2");
  const exact = group.every((c) => c.kind === "exact");
  title.textContent = `Group ${number} · ${exact ? "exact" : "near"} · ${group.length} copies`;
  const members = document.createElement("div");
  members.className = "members";
  members.append(...group.map(copyCard));
  box.append(title, members);
  return box;
}

async function showDuplicates(offset) {
  showMessage("");
  if (offset === 0) {
    clearResults();
    clearQuery();
    hideGroups();
  }
  $("status").textContent = "Grouping duplicates…";
  let body;
  try {
    const response = await fetch(`/duplicates?offset=${offset}&limit=20`);
    if (!response.ok) { $("status").textContent = ""; showMessage(await errorText(response)); return; }
    body = await response.json();
  } catch (err) {
    $("status").textContent = "";
    showMessage(`The server cannot be reached (${err.message}).`);
    return;
  }
  $("groups").hidden = false;
  $("groups").append(...body.groups.map((g, i) => groupBox(g, offset + i + 1)));
  groupsNext = body.next_offset;
  $("more-groups").hidden = groupsNext === null;
  const at = `at similarity ${body.threshold.toFixed(3)}`;
  $("status").textContent = body.total ? `${body.total} groups of copies ${at}` : `No duplicates ${at}`;
}

async function start(search) {
  showMessage("");
  hideGroups();
  current = search;
  $("more").hidden = true;
  $("status").textContent = "Searching…";
  const page = await fetchPage(search, 0, pageSize());
  if (current !== search) return; // a newer search started meanwhile
  if (page.error) { fail(page.error); return; }
  show(page.body, false);
}

async function more() {
  const search = current;
  if (!search || search.next === null) return;
  const k = Math.min(pageSize(), limits.max_k - search.next);
  $("more").disabled = true;
  const page = await fetchPage(search, search.next, k);
  $("more").disabled = false;
  if (current !== search) return;
  if (page.error) { showMessage(page.error); return; } // the results shown so far stay
  show(page.body, true);
}

function preview(src) {
  $("preview").src = src;
  $("preview").hidden = false;
  $("drop-text").hidden = true;
}

function searchFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/") && file.type !== "") {
    fail(`${file.name} is not an image.`);
    return;
  }
  if (file.size > limits.max_body_bytes) {
    fail(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB; the limit is ${(limits.max_body_bytes / 1048576).toFixed(1)} MB.`);
    return;
  }
  preview(URL.createObjectURL(file));
  $("query-item").hidden = true;
  start({
    about: "",
    fetch: (offset, k) => {
      const form = new FormData();
      form.append("image", file, file.name);
      return fetch(`/search?${options(offset, k)}`, { method: "POST", body: form });
    },
  });
}

function searchItem(hit) {
  preview(hit.thumbnail);
  const caption = $("query-item");
  const open = document.createElement("a");
  open.href = hit.image;
  open.target = "_blank";
  open.rel = "noopener";
  open.textContent = "full image";
  caption.replaceChildren(`Similar to ${hit.name}${hit.label ? ` (${hit.label})` : ""} · `, open);
  caption.hidden = false;
  start({
    about: ` (${hit.name} itself left out)`,
    fetch: (offset, k) => fetch(`/items/${hit.id}/similar?${options(offset, k)}&exclude_self=true`),
  });
}

function setUp() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (e) => searchFile(e.target.files[0]));
  $("more").addEventListener("click", more);
  $("duplicates").addEventListener("click", () => showDuplicates(0));
  $("more-groups").addEventListener("click", () => { if (groupsNext !== null) showDuplicates(groupsNext); });
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
