"""Downstream evaluation with lm-evaluation-harness (lm-eval 0.4.13).

    backend.py      RWKVDistLM: the `rwkv_dist` model of lm-eval (loglikelihood with the context's recurrent state
                    reused for every continuation, loglikelihood_rolling through the state in constant memory,
                    greedy generate_until with stop sequences), batched
    harness.py      run_tasks(): tasks (local ones via an include path, and the `rwkv-paper` preset) -> lm-eval's
                    results, with one-line errors for unknown tasks and datasets missing on this machine
    rwkv_paper.yaml the paper's zero-shot suite and the documented figures of the official RWKV-4 checkpoints

`python -m rwkv_dist.evaluation ARGS` is lm-eval's own command line with the `rwkv_dist` model registered
(`--model rwkv_dist --model_args pretrained=CHECKPOINT`); `rwkv-dist lm-eval` is the short form.
"""
