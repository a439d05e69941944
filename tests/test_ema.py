"""EMA callback: the update formula, warm-up, swapping, and what lands in the checkpoint."""
import pytest
import torch
from torch import nn

from diffexp.callbacks.ema import EMA, ema_state_from_checkpoint


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.register_buffer("count", torch.tensor(0))  # integer buffers are not averaged


def test_update_formula_with_warmup():
    module, ema = Holder(), EMA(decay=0.9, warmup=True)
    ema.on_fit_start(None, module)
    expected = torch.zeros(3)
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        module.w.data.fill_(value)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * value
        ema.on_train_batch_end(None, module, None, None, n)
    assert torch.allclose(ema.ema_state["w"], expected)
    assert "count" not in ema.ema_state


def test_no_warmup_uses_constant_decay():
    module, ema = Holder(), EMA(decay=0.5, warmup=False)
    ema.on_fit_start(None, module)
    module.w.data.fill_(2.0)
    ema.on_train_batch_end(None, module, None, None, 0)
    assert torch.allclose(ema.ema_state["w"], torch.full((3,), 1.0))


def test_swapped_restores_raw_weights_and_checkpoint_keeps_them():
    module, ema = Holder(), EMA(decay=0.5, warmup=False)
    ema.on_fit_start(None, module)
    module.w.data.fill_(4.0)
    ema.on_train_batch_end(None, module, None, None, 0)  # ema = 2
    with ema.swapped(module):
        assert torch.allclose(module.w, torch.full((3,), 2.0))
        checkpoint = {"state_dict": module.state_dict()}
        ema.on_save_checkpoint(None, module, checkpoint)
        assert torch.allclose(checkpoint["state_dict"]["w"], torch.full((3,), 4.0))
    assert torch.allclose(module.w, torch.full((3,), 4.0))
    checkpoint["callbacks"] = {"EMA{'decay': 0.5}": ema.state_dict()}
    assert torch.allclose(ema_state_from_checkpoint(checkpoint)["w"], torch.full((3,), 2.0))


def test_state_round_trip():
    module, ema = Holder(), EMA(decay=0.9)
    ema.on_fit_start(None, module)
    ema.on_train_batch_end(None, module, None, None, 0)
    restored = EMA(decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and torch.equal(restored.ema_state["w"], ema.ema_state["w"])


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match="callbacks.ema.decay"):
        EMA(decay=decay)
