"""elva: a thin trainer for ELVA ranking-driven multimodal retrieval, built on elva_kernels' public ops."""
