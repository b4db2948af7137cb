"""Synthetic training data from a glossary (`affiner synth`): `glossary` and `skos` read it into
`terms`, `offline` (from the phrasing `banks`) or `llm` (a model at an endpoint, its `replies`
checked) write the conversations, and `synth` runs the whole and writes the files."""
