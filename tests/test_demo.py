"""The README's demo path end to end (short): embedded corpus -> tokenizer -> shards -> training -> sample."""

import math

from rwkv_dist.demo import run_demo


def test_demo_trains_and_the_loss_falls(tmp_path, capsys):
    first, last, val = run_demo(out=tmp_path / "demo", steps=80, batch_size=4, ctx_len=64)
    assert first > 7.0 and last < first - 1.2  # from ~ln(2048) = 7.6 at init
    assert val < math.log(2048) - 1.2
    out = capsys.readouterr().out
    assert "val loss" in out and "sample (recurrent mode)" in out
    assert (tmp_path / "demo" / "data" / "manifest.json").exists()
