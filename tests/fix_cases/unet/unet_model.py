"""Full assembly of the parts to form the complete network (milesial/Pytorch-UNet
unet/unet_model.py, with a width argument so that tests stay small)."""

from .unet_parts import *  # noqa: F403 - as the repository writes it


class UNet(nn.Module):  # noqa: F405
    def __init__(self, n_channels=3, n_classes=2, bilinear=False, width=64):
        super().__init__()
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.bilinear = bilinear

        self.inc = DoubleConv(n_channels, width)  # noqa: F405
        self.down1 = Down(width, width * 2)  # noqa: F405
        self.down2 = Down(width * 2, width * 4)  # noqa: F405
        self.down3 = Down(width * 4, width * 8)  # noqa: F405
        factor = 2 if bilinear else 1
        self.down4 = Down(width * 8, width * 16 // factor)  # noqa: F405
        self.up1 = Up(width * 16, width * 8 // factor, bilinear)  # noqa: F405
        self.up2 = Up(width * 8, width * 4 // factor, bilinear)  # noqa: F405
        self.up3 = Up(width * 4, width * 2 // factor, bilinear)  # noqa: F405
        self.up4 = Up(width * 2, width, bilinear)  # noqa: F405
        self.outc = OutConv(width, n_classes)  # noqa: F405

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)
