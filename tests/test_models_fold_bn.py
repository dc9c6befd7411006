"""BatchNorm folded into the convolution before it: same outputs over many architectures, or no folding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferlab.models.fold_bn import fold_batchnorm
from transferlab.models.heads import HeadConfig, build_classifier
from transferlab.models.registry import resolve_backbone


def _with_trained_statistics(model: nn.Module) -> nn.Module:
    """Random-init BatchNorms are the identity map; give them statistics a trained network would have."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g) * 0.5 + 1)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


@pytest.mark.parametrize("backbone, size, folds_all", [
    ("tf_efficientnet_lite0", 64, True),      # timm norm+act layers after TF-'SAME' convolutions
    ("resnet18", 64, True),                   # timm, residual blocks and a downsample branch
    ("tv:resnet18", 64, True),
    ("tv:mobilenet_v3_small", 64, True),
    ("tv:densenet121", 64, False),            # most BatchNorms come before their convolution
])
def test_folded_model_gives_the_same_outputs_and_leaves_the_original_alone(backbone, size, folds_all):
    model = _with_trained_statistics(build_classifier(resolve_backbone(backbone, pretrained=False), 3, HeadConfig()))
    before = _batchnorms(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    folded, n = fold_batchnorm(model, x[:1])
    assert n > 0 and _batchnorms(model) == before  # the original keeps its BatchNorms
    assert _batchnorms(folded) == (0 if folds_all else before - n)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


class _RawOutputReused(nn.Module):
    """conv -> BN, plus the convolution's raw output added back: folding would change the result."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_convolution_whose_raw_output_is_read_elsewhere_is_not_folded():
    model = _with_trained_statistics(_RawOutputReused())
    folded, n = fold_batchnorm(model, torch.randn(1, 3, 8, 8))
    assert folded is model and n == 0


def test_folding_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train(), torch.randn(1, 3, 8, 8))


def test_predict_and_evaluate_run_the_folded_model(tiny_run):
    from transferlab.evaluation.predict import load_inference_model, load_run_model

    trained, _ = load_run_model(tiny_run)
    inference, meta = load_inference_model(tiny_run)
    assert _batchnorms(trained) > 0 and _batchnorms(inference) < _batchnorms(trained)
    size = meta["preprocessing"]["input_size"]
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(inference(x).softmax(1), trained(x).softmax(1), rtol=1e-4, atol=1e-5)
    from transferlab.export.predictors import TorchPredictor

    assert _batchnorms(TorchPredictor(tiny_run).model) == _batchnorms(inference)


def test_the_feature_pass_folds_a_copy_and_leaves_the_training_model_and_the_rng_alone(tiny_data, monkeypatch):
    from transferlab.data.sources import load_splits
    from transferlab.data.transforms import eval_transform
    from transferlab.training import feature_cache

    model = _with_trained_statistics(build_classifier(resolve_backbone("test_efficientnet", pretrained=False, img_size=32),
                                                      2, HeadConfig()))
    samples = load_splits(str(tiny_data), progress=False).train[:8]
    transform = eval_transform(model.preprocessing)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    folded_copies = []
    real_copy = feature_cache.inference_copy
    monkeypatch.setattr(feature_cache, "inference_copy", lambda m: folded_copies.append(real_copy(m)) or folded_copies[-1])
    fast = feature_cache.extract_features(model, samples, transform)
    assert torch.equal(torch.get_rng_state(), rng)  # augmented views drawn later see the same stream
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and _batchnorms(model) > 0
    assert folded_copies[0] is not model and _batchnorms(folded_copies[0]) < _batchnorms(model)
    monkeypatch.setattr(feature_cache, "inference_copy", lambda m: m)
    torch.testing.assert_close(fast, feature_cache.extract_features(model, samples, transform), rtol=1e-4, atol=1e-5)


def test_bench_infer_times_the_model_predict_runs(tiny_run, tmp_path, monkeypatch):
    from transferlab.evaluation import predict as predict_mod
    from transferlab.export import bench_infer

    loaded = []
    real = predict_mod.load_inference_model
    monkeypatch.setattr(predict_mod, "load_inference_model", lambda run: loaded.append(run) or real(run))
    bench_infer._eager(tiny_run, tmp_path, 1)
    assert loaded == [tiny_run]
