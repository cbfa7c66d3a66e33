"""--model.compile_layers: every transformer block compiled (dynamic shapes). The losses and gradients equal eager's
on the packed mask path and on the variable-length path under gradient checkpointing (the attention eager inside the
compiled blocks), nothing recompiles as the batches' lengths change, the state_dict keys stay as they are, a fit
through the CLI trains, DDP and FSDP on 2 CPU processes train as eager does, and DeepSpeed stops at start-up
naming the flag.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from vpa_lightning import PreferenceDataModule, VisionDPOModule  # noqa: E402
from vpa_lightning.models.compiled import transformer_blocks  # noqa: E402


@pytest.fixture(scope="module")
def batches(demo_shards):
    module = VisionDPOModule("tiny:llava")
    dm = PreferenceDataModule(str(demo_shards), batch_size=3, processor=module.processor)
    out = list(iter(dm.val_dataloader()))[:3]
    lengths = {b["inputs"].model_inputs["input_ids"].shape[1] for b in out}
    assert len(lengths) == 3, lengths  # each batch another length: a static compile would recompile
    return out


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _run(batches, compile_layers: bool, **kwargs):
    torch.manual_seed(0)
    module = VisionDPOModule("tiny:llava", lora_dropout=0.0, compile_layers=compile_layers, **kwargs)
    with torch.no_grad():  # the adapters away from zero, so the policy is not its reference
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    results, compiled = [], []
    for batch in batches:
        before = _graphs()
        out = module.compute_loss(batch)
        out["losses"].mean().backward()
        grads = torch.cat([p.grad.flatten() for p in module.model.parameters() if p.grad is not None])
        module.model.zero_grad()
        results.append((out["losses"].detach(), grads))
        compiled.append(_graphs() - before)
    return module, results, compiled


@pytest.mark.parametrize("options", [{"packed": True}, {"packed": True, "packed_attention": "varlen",
                                                          "gradient_checkpointing": True}],
                         ids=["packed-mask", "varlen-checkpointing"])
def test_compiled_blocks_equal_eager_and_do_not_recompile(batches, options, no_pack_fallback):
    eager, expected, none = _run(batches, False, **options)
    module, got, compiled = _run(batches, True, **options)
    assert none == [0, 0, 0]
    # the first batch compiles (policy, reference; 5-6 graphs with the attention's breaks); new lengths do not
    assert compiled[0] > 0 and compiled[1:] == [0, 0], compiled
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in transformer_blocks(module.model))
    for (loss0, grad0), (loss1, grad1) in zip(expected, got):
        torch.testing.assert_close(loss1, loss0, rtol=1e-4, atol=1e-5)
        assert float(torch.linalg.vector_norm(grad1 - grad0) / torch.linalg.vector_norm(grad0)) < 1e-4
    assert list(module.state_dict()) == list(eager.state_dict())  # checkpoints unchanged


def test_fit_through_the_cli_with_compiled_blocks(demo_shards, tmp_path):
    from pathlib import Path

    from vpa_lightning.cli import cli_main

    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    cli = cli_main(["fit", "--config", str(demo), "--data.train_shards", str(demo_shards),
                    "--model.compile_layers", "true", "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
                    "--trainer.enable_checkpointing", "false"])
    assert cli.trainer.global_step == 3 and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in transformer_blocks(cli.model.model))


@pytest.mark.parametrize("strategy", ["DeepSpeedStrategy", "ModelParallelStrategy"])
def test_deepspeed_and_model_parallel_stop_at_start_up(strategy):
    from types import SimpleNamespace

    module = VisionDPOModule("tiny:llava", compile_layers=True)
    module._trainer = SimpleNamespace(strategy=type(strategy, (), {})())  # a strategy of that class name
    with pytest.raises(ValueError, match=f"--model.compile_layers runs on one device, under DDP or FSDP, not under {strategy}"):
        module.configure_model()
    assert "model" not in module._modules  # stopped before loading anything


def test_compiled_blocks_under_ddp_on_two_ranks(demo_shards, tmp_path):
    """The demo config (full fine-tuning with its compiled reference, a trainable vision tower) with compiled blocks,
    2 CPU processes under plain DDP: both ranks take the same steps and end with the same weights, bit for bit."""
    from .test_multi_device import _fit

    ranks = _fit(tmp_path, f"--data.train_shards={demo_shards}", "--trainer.callbacks=[]", "--trainer.max_steps=3",
                 "--model.compile_layers=true", f"--model.reference_cache_dir={tmp_path / 'ref'}",
                 "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false", devices=2,
                 config="configs/demo.yaml")
    assert [r["global_step"] for r in ranks] == [3, 3]
    assert ranks[0]["params_sha"] == ranks[1]["params_sha"]
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full-finetuning"])
def test_compiled_blocks_under_fsdp_train_as_eager(demo_shards, tmp_path, lora):
    """Lightning's FSDPStrategy on 2 CPU processes (tests/trainer/cpu_fsdp.py; rank 1 builds on the meta device),
    eager and compiled, dropout off: both ranks hold the same full weights, and the compiled run's weights and
    losses are the eager run's up to float rounding (full fine-tuning: its compiled reference too)."""
    import json

    from .test_strategies import _fit

    def run(root, *extra):
        probe = root / "fsdp"
        ranks = _fit(demo_shards, root, "--trainer.accelerator=cpu", "--trainer.devices=2", "--model.lora_dropout=0",
                     f"--model.lora={str(lora).lower()}", *extra,
                     "--trainer.strategy=tests.trainer.cpu_fsdp.CPUFSDPStrategy", f"--trainer.strategy.out_dir={probe}",
                     "--trainer.callbacks+=tests.trainer.cpu_fsdp.FullParamsProbe", f"--trainer.callbacks.out_dir={probe}")
        trained = [json.loads((probe / f"trained{r}.json").read_text()) for r in (0, 1)]
        assert trained[0] == trained[1]
        return [r["losses"] for r in ranks], trained[0]

    eager_losses, eager = run(tmp_path / "eager")
    losses, compiled = run(tmp_path / "compiled", "--model.compile_layers=true")
    assert torch.tensor(losses).allclose(torch.tensor(eager_losses), atol=1e-5)
    assert all(abs(steps[1] - steps[0]) > 1e-6 for steps in eager_losses)  # the first step moved the weights
    assert max(abs(eager[k] - compiled[k]) for k in eager) < 1e-6  # rounding, not another training
