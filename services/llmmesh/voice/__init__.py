"""The reference voice front end: speakable chunks from the mesh, spoken by eSpeak NG as they arrive."""

from __future__ import annotations

from llmmesh.voice.frontend import SpokenChunk, VoiceFrontEnd, VoiceRun
from llmmesh.voice.tts import EspeakNg, Speech, SynthesisError

__all__ = ["EspeakNg", "Speech", "SpokenChunk", "SynthesisError", "VoiceFrontEnd", "VoiceRun"]
