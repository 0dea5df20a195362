"""Training side of mullama-sdk, in three sub-packages (everything here imports torch; the runtime,
``mullama_sdk``, never imports this package):

* :mod:`training.reference` - the torch reference of MU-LLaMA: the model every export is verified
  against, and the loaders that build it from a checkpoint plus the LLaMA and MERT folders;
* :mod:`training.recipes` - MU-LLaMA's two training stages (pretrain, finetune): recipe configs,
  MusicQA data, the MERT feature cache, the shared training loop and the stages themselves;
* :mod:`training.evaluation` - answering a MusicQA-format set and scoring the answers.

The command line over all three is ``mullama-train`` (:mod:`training.cli`).
"""
