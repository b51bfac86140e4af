"""BatchNorm folded into the convolutions before it, for the bf16 extraction's forward: the
same function as the model, pairs read off the forward itself, the model never changed, and
no fold where it would change what the model computes."""

import pytest
import timm
import torch
from torch import nn

from common.folding import conv_bn_pairs, fold_batchnorm


def with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` in eval mode with BatchNorm statistics and affine parameters far from the
    defaults (a pretrained model's), so that a fold that dropped any of them would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet"])
def test_the_folded_copy_computes_the_models_function_with_no_batchnorm_left(name):
    torch.manual_seed(0)
    model = with_statistics(timm.create_model(name, pretrained=False, num_classes=3))
    x = torch.randn(3, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert batchnorms > 3
    # every BatchNorm in these models normalises a convolution's output (timm's
    # BatchNormAct2d included: test_efficientnet's, which keep their activation)
    assert len(conv_bn_pairs(model, x[:1])) == batchnorms
    folded = fold_batchnorm(model, x[:1])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():  # other images than the fold's check
        assert torch.allclose(folded(x[1:]), model(x[1:]), rtol=1e-4, atol=1e-5)
    # the model itself is untouched: weights, statistics, modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == batchnorms


class ConvBN(nn.Module):
    """conv -> BatchNorm, and `skip`: the convolution's raw output added to the result too."""

    def __init__(self, skip=False, twice=False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.skip, self.twice = skip, twice

    def forward(self, x):
        c = self.conv(x)
        y = self.bn(c)
        if self.twice:  # the convolution runs again on the BatchNorm's output
            y = self.conv(y[:, :3])
        return y + c if self.skip else y


def test_no_fold_where_it_would_change_what_the_model_computes():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    plain = with_statistics(ConvBN())
    assert conv_bn_pairs(plain, x) == [("conv", "bn")]
    assert isinstance(fold_batchnorm(plain, x).bn, nn.Identity)
    # the convolution's output is used past the BatchNorm too: the pair is found, but the
    # folded copy computes something else, and the check gives the model back
    skip = with_statistics(ConvBN(skip=True))
    assert conv_bn_pairs(skip, x) == [("conv", "bn")]
    assert fold_batchnorm(skip, x) is skip
    # a convolution that runs twice is no pair (its weights serve another input too)
    assert conv_bn_pairs(with_statistics(ConvBN(twice=True)), x) == []
    # a BatchNorm in training mode normalises with the batch's statistics: no pair
    training = with_statistics(ConvBN())
    training.bn.train()
    assert conv_bn_pairs(training, x) == []
    assert fold_batchnorm(training, x) is training
