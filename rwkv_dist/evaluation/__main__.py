"""lm-eval's own command line with the `rwkv_dist` model registered:

    python -m rwkv_dist.evaluation run --model rwkv_dist --model_args pretrained=CKPT --tasks piqa
"""

from lm_eval.__main__ import cli_evaluate

from . import backend  # noqa: F401  (registers the model)

if __name__ == "__main__":
    cli_evaluate()
