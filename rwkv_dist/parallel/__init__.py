"""Parallel strategies, applied to the parallelism-free model from outside. Each is one class with the same surface:
build the engine(s), `train_step`, `forward_logits`, `save` / `load` / `files_to_check`, `model_state`.

    DataParallel      zero3 (DeepSpeed ZeRO-3) and ddp (ZeRO-0)
    PipelineParallel  pipeline: stages of blocks, ZeRO-3 inside every stage, 1F1B or GPipe
"""
