"""Layer-wise learning-rate decay: ViT parameters grouped by depth, lrs by the formula."""

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from pytorch_metric_learning.losses import MultiSimilarityLoss, ProxyAnchorLoss

from retrieval.models import Embedder, create_backbone
from retrieval.training.module import RetrievalModule
from retrieval.training.schedules import layer_id, warmup_cosine

LR, DECAY, HEAD = 1e-4, 0.75, 10.0


def module_for(backbone, layer_decay, loss=None, scheduler=None) -> RetrievalModule:
    embedder = Embedder(
        backbone, embedding_dim=16, pooling="token" if "vit" in backbone.name else "gem"
    )
    module = RetrievalModule(
        embedder,
        loss or MultiSimilarityLoss(),
        partial(torch.optim.AdamW, lr=LR),
        scheduler=scheduler,
        head_lr_multiplier=HEAD,
        layer_decay=layer_decay,
    )
    module._trainer = SimpleNamespace(estimated_stepping_batches=100)  # what the scheduler reads
    return module


@pytest.fixture(scope="module")
def vit():
    return create_backbone("vit_tiny_patch16_224", pretrained=False, img_size=32)


def test_vit_groups_follow_the_formula(vit):
    module = module_for(vit, DECAY, loss=ProxyAnchorLoss(num_classes=4, embedding_size=16))
    optimizer = module.configure_optimizers()
    groups = {g["name"]: g for g in optimizer.param_groups}
    depth = len(vit.net.blocks)  # L = 12
    assert [n for n in groups if n.startswith("backbone")] == [
        f"backbone.layer{i}" for i in range(depth + 2)
    ]
    for i in range(depth + 2):
        assert groups[f"backbone.layer{i}"]["lr"] == pytest.approx(LR * DECAY ** (depth + 1 - i))
    assert groups["backbone.layer13"]["lr"] == pytest.approx(LR)  # the final norm
    assert groups["head"]["lr"] == pytest.approx(LR * HEAD)
    assert groups["loss"]["lr"] == pytest.approx(module.loss_lr)
    stem = {id(p) for p in groups["backbone.layer0"]["params"]}
    net = vit.net
    assert {id(net.cls_token), id(net.pos_embed), id(net.patch_embed.proj.weight)} <= stem
    assert {id(p) for p in net.blocks[3].parameters()} == {
        id(p) for p in groups["backbone.layer4"]["params"]
    }


def test_every_trainable_parameter_is_in_exactly_one_group(vit):
    module = module_for(vit, DECAY, loss=ProxyAnchorLoss(num_classes=4, embedding_size=16))
    vit.net.pos_embed.requires_grad_(False)  # frozen parameters are left out
    try:
        optimizer = module.configure_optimizers()
    finally:
        vit.net.pos_embed.requires_grad_(True)
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable - {id(vit.net.pos_embed)}
    assert id(vit.net.pos_embed) not in ids


def test_the_schedule_scales_every_group(vit):
    module = module_for(vit, DECAY, scheduler=partial(warmup_cosine, warmup_fraction=0.1))
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    base = [g["initial_lr"] for g in optimizer.param_groups]
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    factor = optimizer.param_groups[0]["lr"] / base[0]
    assert 0 < factor < 1
    for group, lr in zip(optimizer.param_groups, base, strict=True):
        assert group["lr"] == pytest.approx(lr * factor)


def test_no_layer_decay_keeps_one_backbone_group(vit):
    optimizer = module_for(vit, None).configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == ["backbone", "head"]


def test_layer_decay_on_a_cnn_names_the_key_and_the_backbone():
    resnet = create_backbone("resnet18", pretrained=False)
    module = module_for(resnet, DECAY)
    with pytest.raises(ValueError, match=r"model\.layer_decay.*") as err:
        module.configure_optimizers()
    assert "resnet18" in str(err.value)


def test_layer_ids_of_named_parameters():
    assert layer_id("cls_token", 12) == layer_id("reg_token", 12) == 0
    assert layer_id("patch_embed.proj.weight", 12) == layer_id("norm_pre.weight", 12) == 0
    assert layer_id("blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("blocks.11.mlp.fc2.bias", 12) == 12
    assert layer_id("norm.weight", 12) == layer_id("fc_norm.bias", 12) == 13
