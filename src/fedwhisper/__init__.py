"""fedwhisper: fine-tune Whisper per client, merge the client models, measure everything."""

__version__ = "0.1.0"
