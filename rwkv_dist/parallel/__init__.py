"""Parallel strategies, applied to the parallelism-free model from outside. Each is one class with the same surface:
build the engine(s), `train_step`, `forward_logits`, `save` / `load` / `files_to_check`, `model_state`.

    DataParallel      zero3 (DeepSpeed ZeRO-3) and ddp (ZeRO-0)
    PipelineParallel  the 3D engine: P pipeline stages of blocks x D ZeRO-3 replicas x T tensor-parallel ranks
                      (megatron-core layers, rwkv_dist.parallel.tensor); strategy pipeline, or zero3 with tensor > 1
"""

import warnings

# megatron-core announces, on import and on first use, the CUDA-only fused kernels (Transformer Engine, Apex) and
# stream settings it falls back from; none of them applies to the layers used here
warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed", category=UserWarning)
warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS", category=UserWarning)
warnings.filterwarnings("ignore", message=r"The following imports from `dynamic_context.py`", category=DeprecationWarning)
