"""Test and benchmark kit: tiny and real-width model files in the published formats, built in seconds.

Imported by ``tests/`` and ``bench/`` alike (never shipped in the wheel). Everything is generated: no
downloads. Linted like the product.

* :mod:`testkit.make_assets` - the whole source set (Meta LLaMA folder, MERT folder, MU-LLaMA checkpoints,
  test audio) and its command line ``python -m testkit.make_assets OUT_DIR [--shapes ...]``;
* :mod:`testkit.asset_dims` - the widths (tiny, and LLaMA-2-7B / MERT-v1-330M);
* :mod:`testkit.weight_specs` - tensor names, dtypes and random scales of the LLaMA shard and checkpoints;
* :mod:`testkit.mert_files` - MERT's ``config.json`` and random weights;
* :mod:`testkit.tokenizer` - the SentencePiece test tokenizer (trained on the spot, padded to 32000);
* :mod:`testkit.audio` - the synthesised test songs;
* :mod:`testkit.streamed_torch_save` - ``torch.save``-identical files written tensor by tensor;
* :mod:`testkit.llama_gguf` - tiny LLaMA GGUFs and a numpy reference forward for llama.cpp tests.
"""
