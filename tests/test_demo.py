"""The README's demo path end to end (short): embedded corpus -> tokenizer -> shards -> ZeRO-3 on 2 processes -> sample."""

import math

from rwkv_dist.demo import run_demo


def test_demo_trains_with_zero3_on_two_processes_and_the_loss_falls(tmp_path, capsys):
    result = run_demo(out=tmp_path / "demo", overrides=["schedule.steps=60", "model.ctx_len=64",
                                                        "checkpoint.every_steps=30", "logging.val_batches=4"])
    assert result["steps"] == 60
    assert result["first"] > 7.0 and result["last"] < result["first"] - 1.5  # from ~ln(2048) = 7.6 at init
    assert result["val"] < math.log(2048) - 1.5
    out = capsys.readouterr().out
    assert "val loss" in out and "sample (recurrent mode" in out
    run = tmp_path / "demo" / "train"
    assert (run / "checkpoints" / "step_00000060" / "COMPLETE.json").exists()
    assert any((run / "tensorboard").iterdir())
