"""Model formats: the canonical HF Whisper directory, and import/export of openai-whisper and CTranslate2 models.

Entry points: ``base_model.materialize_base``, ``ctranslate2.import_ctranslate2`` / ``export_ctranslate2``,
``openai_whisper.export_openai_pt`` / ``load_openai_model``, ``hf.write_whisper_dir`` / ``read_state_dict``.
"""
