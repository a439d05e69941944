import pytest
import torch

from diffexp.course import net_preset
from diffexp.nets import UNet


def unet_from_conf(size: str, image_size: int, channels: int) -> UNet:
    return net_preset(size, image_size, channels)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("size,image_size,channels", [("tiny", 16, 1), ("small", 16, 1), ("small", 32, 3),
                                                       ("base", 32, 3)])
def test_shapes(size, image_size, channels):
    net = unet_from_conf(size, image_size, channels)
    x = torch.randn(2, channels, image_size, image_size)
    assert net(x, torch.tensor([0, 999])).shape == x.shape


def test_sizes():
    assert 0.8e6 <= n_params(unet_from_conf("tiny", 16, 1)) <= 1.5e6
    assert 5e6 <= n_params(unet_from_conf("small", 16, 1)) <= 8e6
    # DDPM's CIFAR-10 network has 35.7M parameters
    assert n_params(unet_from_conf("base", 32, 3)) == pytest.approx(35.7e6, rel=0.02)


def test_time_and_class_conditioning_change_output():
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,),
               num_classes=3, dropout=0.0)
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # the output conv starts at zero
    x = torch.randn(2, 1, 8, 8)
    a = net(x, torch.tensor([5, 5]), class_labels=torch.tensor([0, 1]))
    b = net(x, torch.tensor([500, 500]), class_labels=torch.tensor([0, 1]))
    c = net(x, torch.tensor([5, 5]), class_labels=torch.tensor([2, 2]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    assert torch.allclose(net(x, torch.tensor([5, 5])), net(x, torch.tensor([5, 5]), class_labels=torch.tensor([3, 3])))


def test_bad_sizes():
    with pytest.raises(ValueError, match="image_size=18.*divisible by 2\\*\\*3 = 8"):
        UNet(image_size=18, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="attention_resolutions.*allowed: \\[16, 8, 4\\]"):
        UNet(image_size=16, channel_mult=(1, 2, 2), attention_resolutions=(32,))
    net = UNet(image_size=16, in_channels=1, base_channels=16, channel_mult=(1, 2), attention_resolutions=())
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.randn(1, 1, 15, 15), torch.tensor([1]))
