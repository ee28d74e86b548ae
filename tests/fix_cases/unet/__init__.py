from .unet_model import UNet as UNet
