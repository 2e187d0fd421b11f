"""mukv_nano: the training recipe of the nano model shipped in ``mukv/assets/nano``.

The core package (``mukv``) evaluates streaming KV-cache methods; it loads the nano checkpoint through
``mukv/models/nano.py`` and never imports this package. This package is how that checkpoint is made: the
synthetic benchmark's training streams, the context layouts of the streaming methods, the training signals
and the loop, each in a short module, read in this order:

* ``examples.py``: one training example = one short synthetic stream (training seeds only) with its
  questions asked at the end, and what the signals need to know about it (evidence, rings, needles);
* ``layouts.py``: what each streaming method's answer sees (``full``, ``window`` = sink + sliding window,
  ``rekv`` = a re-indexed subset of frames, ``uniform`` = a subset encoded fresh, ``mukv`` = independently
  encoded, trimmed blocks); ``tests/test_nano_layouts.py`` pins each to the method it stands for;
* ``forward.py``: one language-model forward under a layout (the streaming methods' attention hook), and the
  attention it can record for the signals;
* ``signals.py``: the signal interface (a config dataclass with ``weight`` / ``until`` and its own knobs;
  ``targets`` before the forward, ``loss`` after it), the attention targets and the answer-word regulariser;
* ``probes.py``: the probes, small heads trained alongside the model and dropped from the checkpoint;
* ``curriculum.py``: stream lengths, distractor density, question types and layouts along the schedule;
* ``recipe.py``: the recipe (loop, network, curriculum, signals), its checks, and the Hydra schema
  generated from those dataclasses;
* ``train.py``: the loop, and ``python -m mukv_nano.train`` (root config ``conf/train_nano.yaml``; earlier
  recipes in ``conf/nano_recipe/``).
"""
