"""The offline demo's stages, not part of the library's API: Fashion-MNIST as parquet shards
(:mod:`.fashion_mnist`), the supervised demo teacher and the way a demo run starts distillation
(:mod:`.pipeline`), the demo's comparison of teacher, distilled and untrained student (:mod:`.run`) and
the small-scale ablation with its report (:mod:`.ablation`).

``recipes/prepare_fashion_mnist.py``, ``recipes/train_teacher.py``, ``recipes/demo.py`` and
``recipes/ablation.py`` are their front ends. The library itself (distillation, evaluation,
conversion, the Hub) imports nothing from here.
"""
