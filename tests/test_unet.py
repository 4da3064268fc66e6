import dataclasses

import torch

from ddpm.config import ModelConfig
from ddpm.model.unet import (AttentionBlock, UNet, count_parameters, forward_flops,
                             timestep_embedding)

SMALL = ModelConfig(channels=(32, 64, 64), attention=(False, False, True), blocks_per_level=1)


def test_default_architecture_is_the_seeds():
    model = UNet(ModelConfig())
    assert model.config.attention_norm is False  # the seed module's attention
    assert count_parameters(model) == 54_563_779
    assert abs(forward_flops(model, 64) / 1e9 - 17.66) < 0.01


def test_shapes_and_time_dependence():
    torch.manual_seed(0)
    model = UNet(ModelConfig(channels=(32, 64, 64), attention=(False, True, True),
                             blocks_per_level=1)).eval()
    x = torch.randn(2, 3, 16, 16)
    out0 = model(x, torch.tensor([0, 0]))
    out1 = model(x, torch.tensor([0, 30]))
    assert out0.shape == x.shape
    assert torch.allclose(out0[0], out1[0], atol=1e-5)  # image 0 is unchanged
    assert not torch.allclose(out0[1], out1[1], atol=1e-3)  # t reaches the output


def test_timestep_embedding_is_distinct_per_step():
    emb = timestep_embedding(torch.arange(512), 64)
    assert emb.shape == (512, 64)
    assert torch.cdist(emb, emb).add(torch.eye(512) * 10).min() > 1e-2


def _attention_norms(model):
    return [m.norm for m in model.modules() if isinstance(m, AttentionBlock)]


def test_attention_norm_decides_whether_the_attention_input_is_normalised():
    """The seed's module (model.attention_norm: false) creates the norm and never applies
    it: its weights change nothing. With true they do. The parameter count is the same."""
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 30])
    counts = set()
    for normalised in (False, True):
        torch.manual_seed(0)
        model = UNet(dataclasses.replace(SMALL, attention_norm=normalised)).eval()
        counts.add(count_parameters(model))
        norms = _attention_norms(model)
        assert len(norms) == 4  # level 2: one block down, two up; the middle
        with torch.no_grad():
            before = model(x, t)
            for norm in norms:
                norm.weight.mul_(3).add_(0.5)
                norm.bias.add_(1.0)
            after = model(x, t)
        assert torch.equal(before, after) != normalised, normalised
    assert len(counts) == 1


def test_a_model_saved_before_attention_norm_existed_loads_as_normalised(tmp_path):
    from ddpm.evaluate import model_file
    from ddpm.train import checkpoint

    torch.manual_seed(0)
    legacy = UNet(dataclasses.replace(SMALL, attention_norm=True)).eval()
    model_cfg = {k: v for k, v in dataclasses.asdict(SMALL).items() if k != "attention_norm"}
    payload = {"config": {"model": model_cfg, "diffusion": {"steps": 40}, "image_size": 16},
               "model": legacy.state_dict(), "ema": legacy.state_dict()}
    checkpoint.save(tmp_path / "model.pt", payload)
    loaded, _, size = model_file.load_model(model_file.load(tmp_path / "model.pt"))
    assert loaded.config.attention_norm is True and size == 16
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), legacy(x, t))
