"""Small deterministic models shared by the sampler tests."""
import torch


class TinyEps(torch.nn.Module):
    """A small deterministic ε-model with a time dependence, (B, C, H, W) -> same shape."""

    def __init__(self, c=1):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.zero_()
        self.temb = torch.nn.Parameter(torch.randn(1000, generator=g) * 0.1)

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) + self.temb[t].view(-1, *([1] * (x.dim() - 1))) + 0.2 * x


def small_diffusers_unet():
    """A tiny diffusers UNet2DModel (8×8, 3 channels, widths 8-16, seed 0), eval mode."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
