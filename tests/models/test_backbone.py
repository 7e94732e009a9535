import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.data.transforms import eval_transform
from retrieval.infra import io
from retrieval.models import Embedder, WeightsUnavailableError, create_backbone
from retrieval.models import weights as W

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("tf_efficientnet_lite0", pretrained=True)


def classify(backbone, photo: np.ndarray) -> list[int]:
    """Top-5 ImageNet classes of the backbone with its classifier re-attached."""
    import timm

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = W.PACKAGED_WEIGHTS["tf_efficientnet_lite0"]()
    full.load_state_dict(state)
    # The backbone's trunk must be exactly the packaged weights too.
    trunk = backbone.net.state_dict()
    assert all(torch.equal(trunk[k], state[k]) for k in trunk)
    x = eval_transform(backbone.preprocessing)(Image.fromarray(photo))[None]
    with torch.no_grad():
        return full(x).topk(5).indices[0].tolist()


def test_packaged_lite0_weights_classify_real_photos(lite0):
    cat = classify(lite0, skimage_data.chelsea())
    assert cat[0] in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    coffee = classify(lite0, skimage_data.coffee())
    assert coffee[0] in (967, 968)  # espresso, cup


def test_mapping_is_one_to_one_onto_timm_names():
    import timm

    state = W.PACKAGED_WEIGHTS["tf_efficientnet_lite0"]()
    own = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert state.keys() == own.keys()
    assert all(state[k].shape == own[k].shape for k in own)


def test_preprocessing_comes_from_the_weights_config(lite0):
    assert lite0.preprocessing.mean == (0.5, 0.5, 0.5)
    assert lite0.preprocessing.interpolation == "bicubic"
    tv = create_backbone("resnet18", pretrained=False, source="torchvision")
    assert tv.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))
    assert tv.num_features == 512


def test_missing_weights_fail_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(io, "network_reachable", lambda *a, **k: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(W, "cached_timm_file", lambda cfg: None)
    for name, source in (("resnet18", "timm"), ("resnet18", "torchvision")):
        with pytest.raises(WeightsUnavailableError) as err:
            create_backbone(name, pretrained=True, source=source)
        assert "backbone.pretrained=false" in str(err.value)
        assert "backbone.weights=" in str(err.value)


def test_explicit_weights_file_is_loaded_strictly(tmp_path):
    from safetensors.torch import save_file

    source = create_backbone("resnet18", pretrained=False)
    state = {k: v.clone() + 1 for k, v in source.net.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = create_backbone("resnet18", pretrained=True, weights=str(tmp_path / name))
        assert torch.equal(loaded.net.state_dict()["conv1.weight"], state["conv1.weight"])
    del state["conv1.weight"]
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="missing.*conv1.weight"):
        create_backbone("resnet18", weights=str(tmp_path / "bad.safetensors"))


def test_unknown_backbone_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown timm backbone 'resnet_nope'"):
        create_backbone("resnet_nope", pretrained=False)
    with pytest.raises(ValueError, match="unknown torchvision backbone"):
        create_backbone("resnet_nope", pretrained=False, source="torchvision")


@pytest.mark.parametrize("pooling", ["avg", "gem", "max", "avgmax"])
def test_embedder_outputs_unit_rows_for_every_pooling(pooling):
    backbone = create_backbone("resnet18", pretrained=False)
    model = Embedder(backbone, embedding_dim=32, pooling=pooling, head_bn=True).eval()
    out = model(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 32) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_transformer_tokens_and_torchvision_trunks():
    vit = create_backbone("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True)
    assert Embedder(vit, 16, pooling="token")(torch.randn(2, 3, 64, 64)).shape == (2, 16)
    assert Embedder(vit, 16, pooling="avg")(torch.randn(2, 3, 64, 64)).shape == (2, 16)
    tv = create_backbone("resnet18", pretrained=False, source="torchvision")
    assert Embedder(tv, None, pooling="avg")(torch.randn(2, 3, 64, 64)).shape == (2, 512)


def test_frozen_batchnorm_keeps_statistics_and_parameters():
    backbone = create_backbone("resnet18", pretrained=False)
    model = Embedder(backbone, 8, freeze_bn=True).train()
    bn = backbone.net.bn1
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 64, 64) * 5 + 3).sum().backward()
    assert torch.equal(bn.running_mean, before) and not bn.training
    assert bn.weight.grad is None and model.head[0].weight.grad is not None


def test_gem_between_average_and_max():
    from retrieval.models.embedder import AvgPool, GeM, MaxPool

    x = torch.rand(2, 5, 4, 4)
    gem = GeM(p=3.0)(x)
    assert torch.all(gem >= AvgPool()(x) - 1e-6) and torch.all(gem <= MaxPool()(x) + 1e-6)
    assert torch.allclose(GeM(p=1.0)(x), AvgPool()(x), atol=1e-5)
    assert GeM().p.requires_grad
