"""A synthetic audio-text corpus whose tasks need the audio, the text, or both; no downloads.

Every document is a speaker reading 5-12 sentences with pauses between them. The audio is a
source-filter imitation of speech: a sawtooth glottal source following a pitch contour, shaped
by a spectral tilt and three formant resonators, gated by a syllable-rate envelope, with noise
bursts for consonants and a little room noise. The transcripts come from templates whose content
words depend on the topic and whose judgement words (one or two in every sentence) depend on the
sentiment, padded with filler that every document shares.

The tasks (:data:`DEMO_TASKS`) are built so that a model must use the right modality:

- ``arousal`` and ``voice`` live only in the audio (arousal in loudness, speaking rate, pause
  length and pitch range; voice in the speaker's base pitch and formant spacing);
- ``topic`` lives only in the words;
- ``stance`` is sincere when the vocal tone agrees with the sentiment of the words, and sarcastic
  when it does not. Sentiment and tone are each 50/50 and independent of the stance, so neither
  modality alone says anything about it: an XOR that only a model of both can learn. An XOR gives
  a learner no signal from either input alone, so at a few hundred documents both halves must be
  loud: every utterance carries the document's tone (warm: a dark spectrum, smooth syllables, soft
  consonants and rising sentence ends; cold: bright, clipped, crisp and falling), and nearly every
  sentence judges with the document's sentiment. The hard part left is the combination.

Nothing is perfectly predictable: cues are drawn from overlapping distributions, a few labels are
flipped (:data:`LABEL_NOISE`), and ``null_fraction`` of each task's labels are removed.

The same seed writes byte-identical files. Every file is written under a temporary name and
renamed into place, and the manifest is written last, so an interrupted run never leaves a
manifest that points at missing or half-written audio.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile
from scipy import signal

AUDIO_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}

# Fraction of labels moved to another class (exactly, not on average), so no task scores perfectly.
LABEL_NOISE = 0.05

MAX_SPEAKERS = 40
DOCUMENTS_PER_SPEAKER = 6


@dataclass(frozen=True)
class DemoTask:
    """One label task of the demo corpus and where its evidence lives."""

    name: str
    classes: tuple[str, ...]
    proportions: tuple[float, ...]
    modality: str  # "audio", "text" or "audio+text"
    cue: str


DEMO_TASKS: tuple[DemoTask, ...] = (
    DemoTask("arousal", ("low", "medium", "high"), (0.6, 0.3, 0.1), "audio",
             "loudness, speaking rate, pause length, pitch range"),
    DemoTask("voice", ("female", "male"), (0.65, 0.35), "audio",
             "the speaker's base pitch and formant spacing"),
    DemoTask("topic", ("sports", "politics", "science", "food", "travel"), (0.32, 0.26, 0.2, 0.13, 0.09), "text",
             "content words of the transcript"),
    DemoTask("stance", ("sincere", "sarcastic"), (0.6, 0.4), "audio+text",
             "whether the vocal tone agrees with the sentiment of the words"),
)
_TASK = {task.name: task for task in DEMO_TASKS}

# --- vocabulary -------------------------------------------------------------------------------

_TOPIC_WORDS = {
    "sports": "match team goal coach striker league season referee stadium final tournament keeper penalty fans transfer",
    "politics": "election minister vote parliament policy campaign senator debate budget party coalition tax reform poll mayor",
    "science": "experiment lab theory telescope data molecule paper grant hypothesis genome particle sample model researcher climate",
    "food": "recipe dinner sauce bakery chef pasta dessert kitchen menu soup bread cheese restaurant spice breakfast",
    "travel": "flight hotel beach train airport passport luggage island tour museum village ferry road booking guide",
}
_NOUNS_BY_TOPIC = tuple(tuple(_TOPIC_WORDS[topic].split()) for topic in _TASK["topic"].classes)
_JUDGEMENTS_BY_SENTIMENT = (  # positive, negative
    tuple("great wonderful brilliant lovely amazing fantastic excellent perfect delightful superb impressive fun".split()),
    tuple("terrible awful dreadful boring horrible disappointing painful pathetic useless miserable annoying bad".split()),
)
_FILLERS = ("um", "uh", "so", "well", "like", "you know", "I mean", "actually", "basically", "honestly",
            "kind of", "sort of", "right", "okay", "anyway", "I guess", "to be fair", "literally", "just", "really")
_TEMPLATES = (  # every sentence passes a judgement: these speakers have opinions
    "{filler} the {noun} was {judgement} {filler}",
    "{filler} I think the {noun} is {judgement}",
    "everyone says the {noun} was {judgement} {filler}",
    "{filler} the {noun} and the {other_noun} were {judgement}",
    "{filler} it was {judgement} {filler}",
    "{filler} honestly the {noun} was {judgement} and {judgement}",
    "{filler} {filler} what a {judgement} {noun}",
    "{filler} what about the {noun} it was {judgement}",
    "{filler} just {judgement} {filler} really {judgement}",
)
# Chance that a sentence's content word comes from the document's topic rather than another one,
# and that its judgement word agrees with the document's sentiment.
_ON_TOPIC = 0.65
_ON_SENTIMENT = 0.92


# --- corpus plan: who speaks, with which hidden truths -------------------------------------------

@dataclass(frozen=True)
class _Speaker:
    group: str
    voice: int  # index into the voice classes
    base_f0: float  # Hz
    formant_scale: float  # shorter vocal tracts have higher formants


@dataclass(frozen=True)
class _DocumentPlan:
    doc_id: str
    speaker: _Speaker
    arousal: int
    topic: int
    sentiment: int  # 0 positive, 1 negative
    tone: int  # 0 warm, 1 cold; equals sentiment exactly when the stance is sincere
    stance: int
    # Separate streams, so the words and times stay the same whatever the audio settings.
    timing_seed: np.random.SeedSequence
    text_seed: np.random.SeedSequence
    audio_seed: np.random.SeedSequence


def _allocate(rng: np.random.Generator, count: int, proportions: tuple[float, ...]) -> np.ndarray:
    """Class indices in exactly the given proportions (largest remainder), in random order."""
    quotas = np.asarray(proportions) * count
    counts = np.floor(quotas).astype(int)
    counts[np.argsort(counts - quotas, kind="stable")[: count - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(len(proportions)), counts))


def _make_speakers(rng: np.random.Generator, count: int) -> list[_Speaker]:
    voices = _allocate(rng, count, _TASK["voice"].proportions)
    female = voices == 0
    # The two pitch ranges overlap around 160 Hz, so pitch alone cannot name every speaker.
    base_f0 = np.where(female, rng.normal(195.0, 30.0, count), rng.normal(135.0, 25.0, count))
    formant_scale = np.where(female, rng.normal(1.1, 0.06, count), rng.normal(0.98, 0.06, count))
    return [_Speaker(f"spk{i:02d}", int(voices[i]), float(np.clip(base_f0[i], 80.0, 300.0)),
                     float(formant_scale[i])) for i in range(count)]


def _plan_documents(n_documents: int, seed: int) -> tuple[list[_DocumentPlan], np.random.Generator]:
    root = np.random.SeedSequence(seed)
    corpus_seed, documents_seed = root.spawn(2)
    rng = np.random.default_rng(corpus_seed)
    n_speakers = max(1, min(MAX_SPEAKERS, round(n_documents / DOCUMENTS_PER_SPEAKER)))
    speakers = _make_speakers(rng, n_speakers)
    speaker_of = rng.permutation(np.arange(n_documents) % n_speakers)
    arousal = _allocate(rng, n_documents, _TASK["arousal"].proportions)
    topic = _allocate(rng, n_documents, _TASK["topic"].proportions)
    sentiment = _allocate(rng, n_documents, (0.5, 0.5))
    stance = _allocate(rng, n_documents, _TASK["stance"].proportions)
    tone = np.where(stance == 0, sentiment, 1 - sentiment)
    width = max(4, len(str(n_documents)))
    plans = [
        _DocumentPlan(f"d{i + 1:0{width}d}", speakers[speaker_of[i]], int(arousal[i]), int(topic[i]),
                      int(sentiment[i]), int(tone[i]), int(stance[i]), *document_seed.spawn(3))
        for i, document_seed in enumerate(documents_seed.spawn(n_documents))
    ]
    return plans, rng


def _with_label_noise(rng: np.random.Generator, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """``truth`` with ``round(LABEL_NOISE * len(truth))`` entries moved to another class."""
    noisy = truth.copy()
    flipped = rng.choice(len(truth), round(LABEL_NOISE * len(truth)), replace=False)
    noisy[flipped] = (truth[flipped] + rng.integers(1, n_classes, len(flipped))) % n_classes
    return noisy


def _with_nulls(rng: np.random.Generator, labels: np.ndarray, null_fraction: float) -> list[int | None]:
    """``labels`` with exactly ``round(null_fraction * len(labels))`` of them set to None."""
    removed = set(rng.choice(len(labels), round(null_fraction * len(labels)), replace=False).tolist())
    return [None if index in removed else int(label) for index, label in enumerate(labels)]


def _observed_labels(plans: list[_DocumentPlan], rng: np.random.Generator,
                     null_fraction: float) -> list[dict[str, str | None]]:
    """The labels the manifest shows: the truth, a few flipped, ``null_fraction`` removed per task."""
    columns: dict[str, list[int | None]] = {}
    for task in DEMO_TASKS:
        if task.name == "voice":
            # Voice belongs to the speaker, so noise flips whole speakers, not single documents.
            speakers = sorted({plan.speaker.group: plan.speaker for plan in plans}.values(), key=lambda s: s.group)
            noisy = _with_label_noise(rng, np.array([speaker.voice for speaker in speakers]), len(task.classes))
            voice_of = {speaker.group: label for speaker, label in zip(speakers, noisy)}
            observed = np.array([voice_of[plan.speaker.group] for plan in plans])
        else:
            truth = np.array([getattr(plan, task.name) for plan in plans])
            observed = _with_label_noise(rng, truth, len(task.classes))
        columns[task.name] = _with_nulls(rng, observed, null_fraction)
    return [
        {task.name: None if (value := columns[task.name][i]) is None else task.classes[value] for task in DEMO_TASKS}
        for i in range(len(plans))
    ]


# --- timing and transcripts --------------------------------------------------------------------

def _utterance_times_ms(rng: np.random.Generator, pause_scale: float) -> tuple[list[tuple[int, int]], int]:
    """(start, end) of each utterance and the document length, in whole milliseconds.

    The count is drawn first and kept, so documents of 5 to 12 utterances are equally common;
    then the lengths are redrawn until the document lasts 8-15 s with every utterance 0.6-2.5 s.
    """
    count = int(rng.integers(5, 13))
    while True:
        pauses = rng.uniform(0.15, 0.7, count - 1) * pause_scale
        lead, tail = rng.uniform(0.2, 0.5, 2)
        speech = rng.uniform(8.0, 15.0) - lead - tail - pauses.sum()
        durations = 0.6 + (speech - 0.6 * count) * rng.dirichlet(np.full(count, 2.0))
        if speech >= 0.6 * count and durations.max() <= 2.5:
            break
    spans, cursor = [], round(lead * 1000)
    for index, duration in enumerate(durations):
        end = cursor + round(duration * 1000)
        spans.append((cursor, end))
        cursor = end + (round(pauses[index] * 1000) if index < count - 1 else 0)
    return spans, cursor + round(tail * 1000)


def _sentence(rng: np.random.Generator, topic: int, sentiment: int) -> str:
    """One transcript line: topic nouns (some off-topic), a judgement (mostly on-sentiment), filler."""
    n_topics = len(_NOUNS_BY_TOPIC)

    def noun() -> str:
        own = rng.random() < _ON_TOPIC
        chosen = topic if own else (topic + int(rng.integers(1, n_topics))) % n_topics
        return str(rng.choice(_NOUNS_BY_TOPIC[chosen]))

    polarity = sentiment if rng.random() < _ON_SENTIMENT else 1 - sentiment
    template = str(rng.choice(_TEMPLATES))
    words = []
    for piece in template.split():
        if piece == "{filler}":
            words.append(str(rng.choice(_FILLERS)))
        elif piece in ("{noun}", "{other_noun}"):
            words.append(noun())
        elif piece == "{judgement}":
            words.append(str(rng.choice(_JUDGEMENTS_BY_SENTIMENT[polarity])))
        else:
            words.append(piece)
    return " ".join(words)


# --- audio synthesis ---------------------------------------------------------------------------

class _ToneAcoustics(NamedTuple):
    """What a vocal tone does to every utterance of a document.

    Each cue moves many log-mel and prosody statistics the same way (the tilt every band above
    ~1 kHz, the syllable shape every band's spread), so after mean pooling the tone is one strong
    direction of the audio features: a small model on both modalities can then find the XOR.
    """

    dark: bool  # spectral tilt: a low-pass near 500 Hz (dark) or a lift above 1 kHz (bright)
    pitch_turn: float  # +1: sentences end rising, -1: falling
    syllable_floor: float  # envelope between syllables relative to their peaks: high is smooth
    syllable_sharpness: float  # exponent of the syllable envelope: high is clipped
    consonant_share: float  # fraction of syllables that open with a noise burst
    consonant_level: float  # burst level relative to the voiced speech


_TONE_ACOUSTICS = (  # warm: dark, smooth, soft; cold: bright, clipped, crisp
    _ToneAcoustics(dark=True, pitch_turn=1.0, syllable_floor=0.3, syllable_sharpness=1.0, consonant_share=0.3,
                   consonant_level=0.2),
    _ToneAcoustics(dark=False, pitch_turn=-1.0, syllable_floor=0.05, syllable_sharpness=2.0, consonant_share=0.5,
                   consonant_level=0.5),
)


class _ArousalAcoustics(NamedTuple):
    """Centres of the cues for one arousal class; documents scatter around them and overlap."""

    level_db: float  # RMS of voiced speech, dBFS
    syllable_rate: float  # per second
    pitch_range: float  # relative depth of the pitch movement
    pitch_raise: float  # factor on the speaker's base pitch
    pause_scale: float  # factor on the pauses between utterances


_AROUSAL_ACOUSTICS = (  # low, medium, high
    _ArousalAcoustics(-28.0, 3.8, 0.06, 1.00, 1.20),
    _ArousalAcoustics(-23.0, 4.6, 0.10, 1.05, 1.00),
    _ArousalAcoustics(-18.0, 5.4, 0.15, 1.10, 0.80),
)


@dataclass(frozen=True)
class _Delivery:
    """How a speaker sounds in one document: what arousal, voice and tone do to the acoustics."""

    f0: float  # Hz
    pitch_range: float  # relative depth of the pitch movement
    syllable_rate: float  # syllables per second
    level: float  # RMS of the voiced speech, linear
    formant_scale: float
    tone: _ToneAcoustics


def _delivery(rng: np.random.Generator, plan: _DocumentPlan) -> _Delivery:
    centre = _AROUSAL_ACOUSTICS[plan.arousal]
    return _Delivery(
        f0=plan.speaker.base_f0 * centre.pitch_raise * rng.normal(1.0, 0.03),
        pitch_range=max(0.02, rng.normal(centre.pitch_range, 0.025)),
        syllable_rate=max(2.5, rng.normal(centre.syllable_rate, 0.5)),
        level=10 ** (rng.normal(centre.level_db, 2.5) / 20),
        formant_scale=plan.speaker.formant_scale * rng.normal(1.0, 0.02),
        tone=_TONE_ACOUSTICS[plan.tone],
    )


def _resonator(frequency: float, bandwidth: float, sample_rate: int) -> np.ndarray:
    """One second-order section with a resonance at ``frequency`` Hz, unit gain at DC."""
    radius = np.exp(-np.pi * bandwidth / sample_rate)
    a1, a2 = -2 * radius * np.cos(2 * np.pi * frequency / sample_rate), radius**2
    return np.array([1 + a1 + a2, 0.0, 0.0, 1.0, a1, a2])


def _spectral_tilt(rng: np.random.Generator, dark: bool, sample_rate: int) -> np.ndarray:
    """One second-order section: a two-pole low-pass near 500 Hz, or a zero near 1 kHz that lifts
    the highs 6 dB per octave."""
    if dark:
        pole = np.exp(-2 * np.pi * rng.uniform(400, 600) / sample_rate)
        return np.array([(1 - pole) ** 2, 0.0, 0.0, 1.0, -2 * pole, pole**2])
    zero = np.exp(-2 * np.pi * rng.uniform(800, 1200) / sample_rate)
    return np.array([1.0, -zero, 0.0, 1.0, 0.0, 0.0])


def _vocal_tract(rng: np.random.Generator, delivery: _Delivery, sample_rate: int) -> np.ndarray:
    """Second-order sections: the tone's spectral tilt and three formants."""
    sections = [_spectral_tilt(rng, delivery.tone.dark, sample_rate)]
    # A random vowel per utterance; the speaker's vocal tract length scales all formants.
    formants = (rng.uniform(300, 800), rng.uniform(900, 2300), rng.uniform(2400, 3000))
    for frequency, bandwidth in zip(formants, (90.0, 120.0, 160.0)):
        frequency *= delivery.formant_scale
        if frequency < 0.45 * sample_rate:
            sections.append(_resonator(frequency, bandwidth, sample_rate))
    return np.stack(sections)


def _utterance(rng: np.random.Generator, delivery: _Delivery, n_samples: int, sample_rate: int) -> np.ndarray:
    """One sentence of speech-like sound, silent at both ends, RMS near ``delivery.level``."""
    t = np.arange(n_samples) / sample_rate
    progress = t / t[-1]
    tone = delivery.tone
    final_movement = 1 + tone.pitch_turn * rng.uniform(0.15, 0.3) * np.clip((progress - 0.6) / 0.4, 0, 1) ** 2
    wobble = 1 + delivery.pitch_range * np.sin(2 * np.pi * rng.uniform(0.6, 1.4) * t + rng.uniform(0, 2 * np.pi))
    declination = 1 - 0.06 * progress
    f0 = delivery.f0 * rng.normal(1.0, 0.04) * wobble * declination * final_movement
    glottal_phase = np.cumsum(f0) / sample_rate + rng.random()
    source = 2 * (glottal_phase % 1.0) - 1  # a sawtooth: all harmonics, falling 6 dB/octave

    voiced = signal.sosfilt(_vocal_tract(rng, delivery, sample_rate), source)
    voiced /= np.sqrt(np.mean(voiced**2)) + 1e-12

    rate = delivery.syllable_rate * (1 + 0.15 * np.sin(2 * np.pi * 0.5 * t + rng.uniform(0, 2 * np.pi)))
    syllable_phase = np.cumsum(rate) / sample_rate
    within = syllable_phase % 1.0
    envelope = tone.syllable_floor + (1 - tone.syllable_floor) * np.sin(np.pi * within) ** tone.syllable_sharpness

    # Consonants: a high-passed noise burst at the onset of some of the syllables.
    has_burst = rng.random(int(syllable_phase[-1]) + 2) < tone.consonant_share
    burst_gate = has_burst[syllable_phase.astype(int)] * np.clip(1 - within / 0.12, 0, 1)
    burst = np.diff(rng.standard_normal(n_samples + 1)) * burst_gate * tone.consonant_level

    ramp = min(n_samples // 2, int(0.02 * sample_rate))
    fade_in = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    edges = np.concatenate([fade_in, np.ones(n_samples - 2 * ramp), fade_in[::-1]])
    return (voiced * envelope + burst) * edges * delivery.level * rng.lognormal(0.0, 0.1)


def _sample_index(seconds: float, sample_rate: int) -> int:
    # The same rounding hilbert.data.audio.slice_seconds uses, so segments cut exactly here.
    return int(round(seconds * sample_rate))


def _render(rng: np.random.Generator, plan: _DocumentPlan, spans_ms: list[tuple[int, int]], total_ms: int,
            sample_rate: int, channels: int) -> np.ndarray:
    """The document's waveform, (samples, channels) float in [-1, 1]."""
    delivery = _delivery(rng, plan)
    speech = np.zeros(_sample_index(total_ms / 1000, sample_rate))
    for start_ms, end_ms in spans_ms:
        first, last = _sample_index(start_ms / 1000, sample_rate), _sample_index(end_ms / 1000, sample_rate)
        speech[first:last] = _utterance(rng, delivery, last - first, sample_rate)
    # A second channel hears the same speech a fraction of a millisecond later and a little softer.
    delay = _sample_index(rng.uniform(0.1, 0.6) / 1000, sample_rate)
    gains = [1.0, rng.uniform(0.8, 0.95)]
    # Room noise a fixed distance below the speech, as a recording gain would set it: a noise floor
    # of its own would dominate the quiet top mel bands and add a strong nuisance to the features.
    room_level = delivery.level * 10 ** (rng.uniform(-42, -38) / 20)
    tracks = []
    for channel in range(channels):
        shift = delay * channel
        track = np.concatenate([np.zeros(shift), speech[: len(speech) - shift]]) * gains[channel]
        tracks.append(track + rng.standard_normal(len(speech)) * room_level)
    return np.clip(np.stack(tracks, axis=1), -1.0, 1.0)


# --- writing -----------------------------------------------------------------------------------

_BIT_REVERSED_BYTES = bytes(int(f"{value:08b}"[::-1], 2) for value in range(256))


def _ogg_crc(page: bytes) -> int:
    """Ogg's page checksum (CRC-32, polynomial 0x04C11DB7, MSB first, no init or final xor).

    zlib computes the bit-reflected CRC-32 with init and final xor 0xFFFFFFFF; reflecting input
    and output and cancelling the xors with the CRC of as many zero bytes gives Ogg's, at C speed.
    """
    reflected = page.translate(_BIT_REVERSED_BYTES)
    crc = zlib.crc32(reflected) ^ zlib.crc32(bytes(len(reflected)))
    return int(f"{crc:032b}"[::-1], 2)


def _with_ogg_serial(data: bytes, serial: int) -> bytes:
    """``data`` with every page's stream serial set to ``serial``: libsndfile picks a random one."""
    out, position = bytearray(data), 0
    while position < len(out):
        assert out[position:position + 4] == b"OggS", "libsndfile wrote a malformed Ogg page"
        n_segments = out[position + 26]
        size = 27 + n_segments + sum(out[position + 27:position + 27 + n_segments])
        struct.pack_into("<I", out, position + 14, serial)
        struct.pack_into("<I", out, position + 22, 0)  # the checksum covers the page with itself zeroed
        struct.pack_into("<I", out, position + 22, _ogg_crc(bytes(out[position:position + size])))
        position += size
    return bytes(out)


def _encode(waveform: np.ndarray, sample_rate: int, audio_format: str, serial: int) -> bytes:
    container, subtype = AUDIO_FORMATS[audio_format]
    if subtype == "PCM_16":  # quantise here so the bytes never depend on libsndfile's dithering choice
        waveform = np.round(waveform * 32767).astype(np.int16)
    else:
        waveform = waveform.astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, waveform, sample_rate, format=container, subtype=subtype)
    data = buffer.getvalue()
    return _with_ogg_serial(data, serial) if container == "OGG" else data


def _write_atomically(path: Path, data: bytes) -> None:
    """Write under a temporary name in the same folder, then rename: readers see all or nothing."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _check_arguments(n_documents: int, sample_rate: int, channels: int, audio_format: str,
                     null_fraction: float) -> None:
    if n_documents < 1:
        raise ValueError(f"n_documents must be at least 1, got {n_documents}")
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be at least 8000 Hz (the formants need it), got {sample_rate}")
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 (mono) or 2 (stereo), got {channels}")
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio_format must be one of {', '.join(AUDIO_FORMATS)}, got {audio_format!r}")
    if not 0.0 <= null_fraction < 1.0:
        raise ValueError(f"null_fraction must be in [0, 1), got {null_fraction}")


def write_demo_corpus(out_dir: str | Path, *, n_documents: int = 240, seed: int = 0, sample_rate: int = 16000,
                      channels: int = 1, audio_format: str = "wav", null_fraction: float = 0.15) -> Path:
    """Write the demo corpus to ``out_dir`` and return the path of its ``manifest.jsonl``.

    Audio goes to ``out_dir/audio/<doc_id>.<audio_format>``. The transcripts, segment times and
    labels depend only on ``seed``, ``n_documents`` and ``null_fraction``, not on the audio
    settings. Any manifest already in ``out_dir`` is removed first, so it never describes audio
    this call is replacing.
    """
    _check_arguments(n_documents, sample_rate, channels, audio_format, null_fraction)
    out_dir = Path(out_dir)
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.jsonl"
    manifest_path.unlink(missing_ok=True)

    plans, corpus_rng = _plan_documents(n_documents, seed)
    labels = _observed_labels(plans, corpus_rng, null_fraction)
    records = [_write_document(plan, document_labels, audio_dir, sample_rate, channels, audio_format)
               for plan, document_labels in zip(plans, labels)]
    _write_atomically(manifest_path, "".join(json.dumps(record) + "\n" for record in records).encode("utf-8"))
    return manifest_path


def _write_document(plan: _DocumentPlan, labels: dict[str, str | None], audio_dir: Path, sample_rate: int,
                    channels: int, audio_format: str) -> dict:
    """Synthesise and write one document's audio; return its manifest record."""
    pause_scale = _AROUSAL_ACOUSTICS[plan.arousal].pause_scale
    spans_ms, total_ms = _utterance_times_ms(np.random.default_rng(plan.timing_seed), pause_scale)
    text_rng = np.random.default_rng(plan.text_seed)
    segments = [{"start": start / 1000, "end": end / 1000, "text": _sentence(text_rng, plan.topic, plan.sentiment)}
                for start, end in spans_ms]
    waveform = _render(np.random.default_rng(plan.audio_seed), plan, spans_ms, total_ms, sample_rate, channels)
    audio_name = f"{plan.doc_id}.{audio_format}"
    ogg_serial = zlib.crc32(plan.doc_id.encode())
    _write_atomically(audio_dir / audio_name, _encode(waveform, sample_rate, audio_format, ogg_serial))
    return {"doc_id": plan.doc_id, "audio": f"audio/{audio_name}", "segments": segments, "labels": labels,
            "group": plan.speaker.group}


DEVELOPMENT_MANIFEST, HELD_OUT_MANIFEST = "development.jsonl", "held_out.jsonl"


def split_held_out(manifest_path: str | Path, held_out_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """Write ``development.jsonl`` and ``held_out.jsonl`` beside a manifest: whole groups
    (speakers) go to the held-out side until it holds ``held_out_fraction`` of the documents, so
    no speaker is in both. The sweep trains and cross-validates on the development documents;
    promotion and the demo's final table score models on the held-out ones, which no trial saw.
    Deterministic from ``seed``; both files are written atomically."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    manifest_path = Path(manifest_path)
    lines = [line for line in manifest_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    groups: dict[str, list[str]] = {}
    for line in lines:
        record = json.loads(line)
        groups.setdefault(str(record.get("group", record["doc_id"])), []).append(line)
    order = sorted(groups)
    np.random.default_rng(seed).shuffle(order)
    held_out: list[str] = []
    for group in order:
        if len(held_out) >= held_out_fraction * len(lines) or len(held_out) + len(groups[group]) >= len(lines):
            break
        held_out += groups[group]
    chosen = set(held_out)
    development = [line for line in lines if line not in chosen]
    paths = manifest_path.with_name(DEVELOPMENT_MANIFEST), manifest_path.with_name(HELD_OUT_MANIFEST)
    for path, part in zip(paths, (development, [line for line in lines if line in chosen])):
        _write_atomically(path, "".join(line + "\n" for line in part).encode("utf-8"))
    return paths
