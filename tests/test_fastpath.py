"""The frozen fast path equals the plain model: logits, gradients, shared parameters, cached evaluation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fastft.fastpath import (FeatureCache, FrozenPrefix, cached_accuracy, caches_features, checked_fold,
                             fold_all_bn, fold_bn, split_for_training)
from fastft.strategy import Strategy

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")  # ResNet-18's units (fastft.models.resnet)

ALL_K = range(len(STAGES) + 1)  # 0 = nothing frozen .. 5 = the whole backbone (strategy "frozen")


def bn_model(num_classes: int = 2, seed: int = 0) -> nn.Module:
    """ResNet-18 whose every BN has non-trivial running statistics AND affine parameters,
    so a fold that ignores any of the four would show."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def images(n: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a.float() - b.float()) / torch.linalg.vector_norm(b.float())).item()


def frozen_like_engine(model: nn.Module, k: int) -> Strategy:
    """The engine's frozen modules: requires_grad False and eval mode, the rest in train mode."""
    strategy = Strategy(f"k{k}", frozen_stages=k)
    strategy.freeze(model)
    strategy.set_train_mode(model)
    return strategy


def test_fold_bn_equals_conv_then_eval_bn_and_keeps_the_layout():
    model = bn_model().eval()
    conv, bn = model.layer2[0].conv1, model.layer2[0].bn1
    x = torch.randn(2, conv.in_channels, 16, 16)
    folded = fold_bn(conv, bn)
    torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    assert folded.weight.is_contiguous()
    stem = model.to(memory_format=torch.channels_last)
    folded_cl = fold_bn(stem.conv1, stem.bn1)
    assert folded_cl.weight.is_contiguous(memory_format=torch.channels_last)
    assert not folded_cl.weight.is_contiguous()  # 7x7x3 kernels: the two layouts differ


def random_bn(channels: int, seed: int = 3) -> nn.BatchNorm2d:
    """An eval-mode BatchNorm2d whose four statistics and parameters are all non-trivial."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels, eps=1e-3).eval()
    with torch.no_grad():
        for tensor, lo, hi in ((bn.running_mean, -0.2, 0.2), (bn.running_var, 0.5, 1.5),
                               (bn.weight, 0.5, 1.5), (bn.bias, -0.2, 0.2)):
            tensor.copy_(lo + (hi - lo) * torch.rand(channels, generator=g))
    return bn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fold_bn_is_the_exact_fold_keeps_the_conv_and_draws_no_random_numbers(dtype):
    """The folded weight and bias are the fold's algebra in at least fp32, stored in the conv's
    dtype, bit for bit; the conv's settings, device, layout and requires_grad carry over; and no
    random numbers are drawn (a Conv2d built the usual way runs kaiming init on the global RNG)."""
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=1, padding_mode="reflect").to(dtype)
    conv = conv.to(memory_format=torch.channels_last).requires_grad_(False)
    bn = random_bn(16).to(dtype)
    rng = torch.get_rng_state()
    folded = fold_bn(conv, bn)
    assert torch.equal(torch.get_rng_state(), rng)
    wide = torch.promote_types(dtype, torch.float32)
    scale = bn.weight.to(wide) / torch.sqrt(bn.running_var.to(wide) + bn.eps)
    weight = (conv.weight.to(wide) * scale.reshape(-1, 1, 1, 1)).to(dtype)
    bias = ((conv.bias.to(wide) - bn.running_mean.to(wide)) * scale + bn.bias.to(wide)).to(dtype)
    assert torch.equal(folded.weight, weight) and torch.equal(folded.bias, bias)
    assert folded.weight.dtype == folded.bias.dtype == dtype and folded.weight.device == conv.weight.device
    assert folded.weight.is_contiguous(memory_format=torch.channels_last) and not folded.weight.is_contiguous()
    assert not folded.weight.requires_grad and not folded.bias.requires_grad
    assert (folded.stride, folded.padding, folded.padding_mode) == ((2, 2), (1, 1), "reflect")
    assert not any(t.is_meta for t in (*folded.parameters(), *folded.buffers()))
    if dtype == torch.float64:  # the same function, to rounding
        x = torch.randn(2, 8, 11, 11, dtype=dtype)
        torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-12, atol=1e-12)


def test_checked_fold_adopts_the_plain_fold_and_draws_no_random_numbers():
    """The prefix ends as a fold of its own weights (every module equal to fold_all_bn of a
    copy), in eval mode, and checking it draws no random numbers; an input it refuses leaves it as it was."""
    model = bn_model().eval()
    prefix = FrozenPrefix(*copy.deepcopy(list(model.children())[:5])).eval()  # the stem and layer1
    expected = copy.deepcopy(prefix)
    assert fold_all_bn(expected) == 5  # conv1, and two per block
    rng = torch.get_rng_state()
    assert checked_fold(prefix, images()) == 5
    assert torch.equal(torch.get_rng_state(), rng)
    assert str(prefix) == str(expected) and not any(m.training for m in prefix.modules())
    got, want = prefix.state_dict(), expected.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    unfolded = FrozenPrefix(*copy.deepcopy(list(model.children())[:5])).eval()
    children = list(unfolded.children())
    assert checked_fold(unfolded, torch.randn(2, 4, 64, 64)) == 0  # 4 channels: conv1 refuses it
    assert list(unfolded.children()) == children and isinstance(unfolded[1], nn.BatchNorm2d)


@pytest.mark.parametrize("k", ALL_K)
def test_fast_path_logits_equal_the_unfolded_model_in_eval_mode(k):
    model = bn_model().eval()
    x = images()
    with torch.no_grad():
        expected = model(x)
        split = split_for_training(model, k)
        got = split(x)
    assert rel_error(got, expected) < 1e-5
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


# bf16 keeps 8 mantissa bits (unit roundoff 2^-8 = 3.9e-3), and the error compounds over up to 20
# conv layers, so bf16 logits are compared with the fp32 reference relative to the error that bf16
# autocast already makes on the unfolded model: folding may not make AMP meaningfully worse. The
# factor 3 covers run-to-run luck of where the roundings fall; the absolute 5% caps it.
@pytest.mark.parametrize("k", [1, 3, 5])
def test_fast_path_under_bf16_autocast_stays_within_amp_error(k):
    model = bn_model().eval()
    x = images()
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp_plain = model(x)
            amp_fast = split_for_training(model, k)(x)
    amp_error = rel_error(amp_plain, reference)
    fast_error = rel_error(amp_fast, reference)
    assert fast_error < 0.05
    assert fast_error <= 3 * amp_error + 1e-3, (fast_error, amp_error)


# fp64 shows the fast path is the same function: folding is exact algebra, so anything beyond rounding
# (~1e-10 measured) is a bug. fp32 is what the engine runs: there the train-mode BN after the prefix
# can flip a ReLU whose input is within rounding of zero, which moves a few gradient entries of the
# next conv (9e-3 relative measured for one tensor at K=2; the plain model in fp32 vs fp64 flips
# others). A fold that lost a BN term would be off by far more (tens of percent).
@pytest.mark.parametrize("dtype, grad_tol, size", [(torch.float64, 1e-8, 32), (torch.float32, 3e-2, 64)],
                         ids=["fp64", "fp32"])  # fp64 convs are slow on a CPU: 32 px there
@pytest.mark.parametrize("k", ALL_K)
def test_fast_path_gradients_equal_the_plain_frozen_model(k, dtype, grad_tol, size):
    """Train mode where the engine trains: the same loss, gradients and BN statistics."""
    plain = bn_model().to(dtype)
    fast = copy.deepcopy(plain)
    frozen_like_engine(plain, k)
    strategy = frozen_like_engine(fast, k)
    split = split_for_training(fast, k)
    x, y = images(n=4, size=size).to(dtype), torch.tensor([0, 1, 1, 0])

    plain_loss = F.cross_entropy(plain(x), y, reduction="sum")
    fast_loss = F.cross_entropy(split(x), y, reduction="sum")
    plain_loss.backward()
    fast_loss.backward()

    assert fast_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5 if dtype == torch.float32 else 1e-10)
    fast_params = dict(fast.named_parameters())
    trainable = [name for name, p in plain.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("fc.") or k < len(STAGES) for name in trainable)
    for name in trainable:
        fast_grad, plain_grad = fast_params[name].grad, plain.get_parameter(name).grad
        assert rel_error(fast_grad, plain_grad) < grad_tol, name
    for module in strategy.frozen_modules(fast):
        assert all(p.grad is None for p in module.parameters())
    buffer_tol = 1e-5 if dtype == torch.float32 else 1e-10
    for (name, a), b in zip(plain.named_buffers(), fast.buffers()):  # the trained BNs moved alike
        torch.testing.assert_close(b, a, rtol=buffer_tol, atol=buffer_tol, msg=name)


@pytest.mark.parametrize("k", ALL_K)
def test_suffix_shares_the_models_parameters_and_prefix_keeps_none(k):
    model = bn_model()
    before = copy.deepcopy(model.state_dict())
    strategy = frozen_like_engine(model, k)
    split = split_for_training(model, k)
    own = {id(p) for p in model.parameters()}
    frozen = {id(p) for m in strategy.frozen_modules(model) for p in m.parameters()}
    assert {id(p) for p in split.suffix.parameters()} == own - frozen
    if k == 0:
        assert split.prefix is None
        return
    assert not {id(p) for p in split.prefix.parameters()} & own
    assert not any(p.requires_grad for p in split.prefix.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in split.prefix.modules())  # all folded
    assert not split.prefix.training
    out = split.prefix(images())  # no no_grad here: the prefix alone must record nothing
    assert out.grad_fn is None and not out.requires_grad
    if k == len(STAGES):
        assert out.shape == (2, 512)
    for name, tensor in model.state_dict().items():  # folding worked on a copy
        assert torch.equal(tensor, before[name]), name


def test_unfolded_prefix_keeps_bn_in_eval_mode():
    model = bn_model().eval()
    split = split_for_training(model, 3, fold=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in split.prefix.modules())
    with torch.no_grad():
        assert rel_error(split(images()), model(images())) < 1e-6


def test_split_moves_its_prefix_to_the_training_layout_and_stays_equal():
    model = bn_model().eval()
    x = images()
    split = split_for_training(model, 2)
    stem = split.prefix[0]  # conv1 with its BN folded: a 7x7x3 kernel, where the two layouts differ
    assert stem.weight.is_contiguous()
    model.to(memory_format=torch.channels_last)  # the suffix is the model's own: it moves with it
    split.to("cpu", memory_format=torch.channels_last)
    assert stem.weight.is_contiguous(memory_format=torch.channels_last) and not stem.weight.is_contiguous()
    with torch.no_grad():
        got = split(x.contiguous(memory_format=torch.channels_last))
        expected = model(x)
    assert rel_error(got, expected) < 1e-5


def test_split_rejects_a_stage_count_out_of_range():
    with pytest.raises(ValueError, match="0..5"):
        split_for_training(bn_model(), 6)


def full_accuracy(model: nn.Module, batches) -> tuple[int, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    return int((logits.argmax(dim=1) == labels).sum()), logits


def test_feature_cache_gives_the_full_evaluation_before_and_after_the_head_trains():
    model = bn_model(num_classes=5)
    frozen_like_engine(model, len(STAGES))
    split = split_for_training(model, len(STAGES))
    assert caches_features(len(STAGES), len(STAGES)) and not caches_features(len(STAGES) - 1, len(STAGES))
    gen = torch.Generator().manual_seed(2)
    batches = [(images(n=3, size=32, seed=s), torch.randint(0, 5, (3,), generator=gen)) for s in range(4)]
    cache = FeatureCache()
    assert not cache.ready
    cache.fill(iter(batches), split.prefix)  # an iterator: the cache must not need the batches again
    assert cache.ready and cache.examples == 12

    seen = []
    for _ in range(2):
        expected_correct, expected_logits = full_accuracy(model, batches)
        seen.append(expected_logits)
        cached_logits = torch.cat([split.suffix(f) for f, _ in cache.batches()])
        scale = expected_logits.abs().max().item()
        torch.testing.assert_close(cached_logits, expected_logits, rtol=1e-4, atol=1e-5 * scale)
        correct, count = cached_accuracy(cache, split.suffix)
        assert (int(correct), int(count)) == (expected_correct, 12)
        with torch.no_grad():  # the head "trains"; the cached features must still serve it
            model.fc.weight.add_(torch.randn_like(model.fc.weight))
            model.fc.bias.add_(torch.randn_like(model.fc.bias))
    assert not torch.allclose(seen[0], seen[1])  # the second round really met a new head
    cache.clear()
    assert not cache.ready
    with pytest.raises(RuntimeError, match="before fill"):
        cache.batches()


class OneBuffer(nn.Module):
    """A prefix that writes every output into one preallocated buffer and returns (a view of) it,
    as a compiled module replaying a CUDA graph does: the next call overwrites the last output."""

    def __init__(self, prefix: nn.Module):
        super().__init__()
        self.prefix, self.out = prefix, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.prefix(x)
        if self.out is None:
            self.out = torch.empty((64, *y.shape[1:]), dtype=y.dtype)
        return self.out[: y.shape[0]].copy_(y)


def test_feature_cache_keeps_copies_of_a_prefix_that_reuses_its_output_buffer():
    model = bn_model(num_classes=5)
    frozen_like_engine(model, len(STAGES))
    split = split_for_training(model, len(STAGES))
    gen = torch.Generator().manual_seed(3)
    batches = [(images(n=n, size=32, seed=s), torch.randint(0, 5, (n,), generator=gen))
               for s, n in enumerate([4, 4, 3])]  # a ragged last batch, as a test split has
    prefix = OneBuffer(split.prefix)
    cache = FeatureCache()
    cache.fill(iter(batches), prefix)
    kept = [features for features, _ in cache.batches()]
    assert len({f.untyped_storage().data_ptr() for f in kept}) == 3  # three copies, not one buffer
    with torch.no_grad():
        for (x, _), features in zip(batches, kept):
            torch.testing.assert_close(features, split.prefix(x))
    expected_correct, _ = full_accuracy(model, batches)
    correct, count = cached_accuracy(cache, split.suffix)
    assert (int(correct), int(count)) == (expected_correct, 11)
