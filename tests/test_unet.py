import torch

from ddpm.config import ModelConfig
from ddpm.unet import UNet, count_parameters, forward_flops, timestep_embedding


def test_default_architecture_is_the_seeds():
    model = UNet(ModelConfig())
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
