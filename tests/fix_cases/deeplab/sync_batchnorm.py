"""A synchronized BatchNorm shaped like pytorch-deeplab-xception's
modeling/sync_batchnorm/batchnorm.py: a _BatchNorm subclass that, on one device or in eval
mode, is plain batch norm, and on several replicas reduces the statistics through a master."""

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


class _SynchronizedBatchNorm(_BatchNorm):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        super(_SynchronizedBatchNorm, self).__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self._sync_master = None  # set when the module is replicated over devices
        self._is_parallel = False

    def forward(self, input):
        if not (self._is_parallel and self.training):
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias,
                self.training, self.momentum, self.eps)
        # on several replicas: every device's sums meet at the master, which returns one mean and scale
        shape = input.size()
        flat = input.view(shape[0], self.num_features, -1)
        count = flat.size(0) * flat.size(2)
        mean, inv_std = self._sync_master.run_master((flat.sum(dim=(0, 2)), (flat ** 2).sum(dim=(0, 2)), count))
        output = (flat - mean.view(1, -1, 1)) * (inv_std * self.weight).view(1, -1, 1) + self.bias.view(1, -1, 1)
        return output.view(shape)


class SynchronizedBatchNorm2d(_SynchronizedBatchNorm):
    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError('expected 4D input (got {}D input)'.format(input.dim()))
