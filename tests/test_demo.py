"""The README's demo path end to end (short): embedded corpus -> tokenizer -> shards -> training -> sample."""

from rwkv_dist.demo import run_demo


def test_demo_trains_and_the_loss_falls(tmp_path, capsys):
    first, last = run_demo(out=tmp_path / "demo", steps=40, batch_size=4, ctx_len=64)
    assert last < first - 1.5  # from ~ln(2048) = 7.6 at init
    out = capsys.readouterr().out
    assert "val loss" in out and "sample (recurrent mode)" in out
    assert (tmp_path / "demo" / "data" / "manifest.json").exists()
