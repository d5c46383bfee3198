"""Draw the book's architecture figure: book/images/llama2_architecture.svg, and a PNG of it that chapter 7 embeds
(a notebook opened alone in Colab cannot reach the book's images). Run: python tools/draw_architecture.py, then
paste the PNG into chapter 7 as a data URI (tests/test_book.py checks that they are the same)."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.fonttype"] = "none"  # real, searchable text in the SVG (not outlined glyphs)
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().parents[1] / "book" / "images" / "llama2_architecture"
NOTE_X = 4.25  # left edge of the shape notes, right of every box
COLORS = {"embed": "#f6d8ae", "norm": "#d9ead3", "attn": "#cfe2f3", "ffn": "#ead1dc", "out": "#fff2cc", "plain": "#ffffff"}


def box(ax, x, y, w, h, text, kind, note=None):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=COLORS[kind], ec="#333333", lw=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=12, family="DejaVu Sans")
    if note:
        ax.text(NOTE_X, y, note, ha="left", va="center", fontsize=11, color="#444444", family="DejaVu Sans Mono")


def arrow(ax, x0, y0, x1, y1):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=12, lw=1.2, color="#333333"))


def residual(ax, x, y_from, y_to, x_side=-2.25):
    "The skip connection: leave the main path at y_from, run up the side, and enter the + at y_to."
    ax.add_patch(FancyArrowPatch((x, y_from), (x_side, y_from), arrowstyle="-", lw=1.2, color="#333333"))
    ax.add_patch(FancyArrowPatch((x_side, y_from), (x_side, y_to), arrowstyle="-", lw=1.2, color="#333333"))
    arrow(ax, x_side, y_to, x - 0.17, y_to)
    plus(ax, x, y_to)


def sublayer(ax, x, y_skip, y_norm, norm_text, y_body, body_w, body_h, body_text, kind, note, y_plus):
    "One residual sub-layer: RMSNorm, then the body, added back to the skip connection taken at y_skip."
    box(ax, x, y_norm, 4.0, 0.55, norm_text, "norm")
    arrow(ax, x, y_norm + 0.28, x, y_body - body_h / 2 - 0.05)
    box(ax, x, y_body, body_w, body_h, body_text, kind, note)
    arrow(ax, x, y_body + body_h / 2, x, y_plus - 0.18)
    residual(ax, x, y_skip, y_plus)


def plus(ax, x, y):
    ax.add_patch(plt.Circle((x, y), 0.17, fc="white", ec="#333333", lw=1.2))
    ax.text(x, y - 0.01, "+", ha="center", va="center", fontsize=14)


fig, ax = plt.subplots(figsize=(9.5, 12.5))
ax.set_xlim(-3.2, 9.2)
ax.set_ylim(-0.6, 14.2)
ax.axis("off")
X = 1.0
box(ax, X, 0.0, 3.0, 0.55, "tokens", "plain", "(bsz, seqlen)  ints < vocab_size")
box(ax, X, 1.1, 3.0, 0.6, "tok_embeddings", "embed", "(bsz, seqlen, dim)")
arrow(ax, X, 0.3, X, 0.8)
# the repeated block
# the repeated block: wide enough to hold the notes of its two sub-layers, its label above them
ax.add_patch(FancyBboxPatch((-2.7, 1.85), 11.6, 8.55, boxstyle="round,pad=0.05,rounding_size=0.2",
                            fc="#f7f7f7", ec="#888888", lw=1.2, ls="--"))
ax.text(NOTE_X, 10.15, "TransformerBlock  × n_layers", fontsize=12, weight="bold", va="top")
arrow(ax, X, 1.4, X, 2.7)
sublayer(ax, X, 2.35, 3.1, "attention_norm (RMSNorm)", 4.6, 6.0, 1.2,
         "Attention\nwq, wk, wv → RoPE on q, k\nKV cache → grouped-query SDPA → wo", "attn",
         "n_heads queries,\nn_kv_heads keys/values", 5.9)
arrow(ax, X, 6.07, X, 6.6)
sublayer(ax, X, 6.3, 6.9, "ffn_norm (RMSNorm)", 8.2, 4.6, 1.0, "FeedForward (SwiGLU)\nw2( silu(w1 x) · w3 x )", "ffn",
         "dim → hidden → dim", 9.35)
arrow(ax, X, 9.52, X, 10.75)
box(ax, X, 11.05, 4.0, 0.55, "norm (RMSNorm)", "norm")
arrow(ax, X, 11.33, X, 11.75)
box(ax, X, 12.1, 3.0, 0.65, "output (Linear)", "out", "(bsz, seqlen, vocab_size)\ntied to tok_embeddings in\nthe embedded model")
arrow(ax, X, 12.43, X, 12.95)
box(ax, X, 13.3, 3.0, 0.6, "logits → next token", "plain")
ax.set_title("Llama 2, as built in this book (Meta's module names)", fontsize=14)
fig.savefig(OUT.with_suffix(".svg"), bbox_inches="tight")
fig.savefig(OUT.with_suffix(".png"), bbox_inches="tight", dpi=110, metadata={"Software": None})
print("wrote", OUT.with_suffix(".svg"), "and", OUT.with_suffix(".png"))
