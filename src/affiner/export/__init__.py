"""Exporting a finished run: the adapter, the merged model, GGUF + Ollama Modelfile, the model card, the Hub."""
