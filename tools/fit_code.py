"""Fit a notebook's code cells to the book's column (88 characters), without changing what they compute.

    python tools/fit_code.py notebooks/NN_x.ipynb [...]

Only cells with a line longer than 88 characters are touched: trailing comments that overflow move above their
line, long comment lines and one-line docstrings are wrapped, then black (line length 88, long strings split)
reformats the cell. nbdev's `#|` directives are kept as they are. A cell whose code would change meaning is
left alone (its syntax tree must stay the same, docstrings' line breaks aside). nbval's comment markers
(`# NBVAL_SKIP`, `# NBVAL_IGNORE_OUTPUT`) become the cell tags nbval reads. Outputs are not changed, so the
notebook needs no re-execution; run `nbdev-export` afterwards if it has `#| export` cells. Needs black
(`pip install black`)."""
import ast
import io
import json
import re
import sys
import textwrap
import tokenize

try:
    import black
except ImportError:
    sys.exit("tools/fit_code.py needs black: pip install black")
from black.mode import Preview

MAX = 88
MODE = black.Mode(line_length=MAX, string_normalization=False, preview=True,
                  enabled_features={Preview.string_processing})
MARKERS = {"NBVAL_SKIP": "nbval-skip", "NBVAL_IGNORE_OUTPUT": "nbval-ignore-output"}


def move_long_comments(src):
    lines = src.split("\n")
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return src
    moves = {}
    for t in toks:
        if t.type == tokenize.COMMENT:
            row, col = t.start
            line = lines[row - 1]
            if len(line) > MAX and line[:col].strip():  # a trailing comment on a long line
                moves[row] = col
    out = []
    for i, line in enumerate(lines, 1):
        if i in moves:
            col = moves[i]
            code, comment = line[:col].rstrip(), line[col:]
            indent = re.match(r"\s*", line).group(0)
            if comment.startswith("#|"):
                out.append(line); continue
            text = comment.lstrip("#").strip()
            for w in textwrap.wrap(text, MAX - len(indent) - 2, break_on_hyphens=False) or [""]:
                out.append(f"{indent}# {w}")
            out.append(code)
        else:
            out.append(line)
    return "\n".join(out)


def wrap_comment_lines(src):
    out = []
    for line in src.split("\n"):
        m = re.match(r"^(\s*)#(?!\|)\s?(.*)$", line)
        if m and len(line) > MAX:
            indent, text = m.groups()
            out += [f"{indent}# {w}" for w in textwrap.wrap(text, MAX - len(indent) - 2, break_on_hyphens=False)]
        else:
            out.append(line)
    return "\n".join(out)


def wrap_docstrings(src):
    "One-line docstrings (of a module, class or function) longer than MAX, wrapped as triple-quoted text."
    import ast
    try:
        tree = ast.parse("\n".join(l for l in src.split("\n") if not l.lstrip().startswith(("%", "!"))))
    except SyntaxError:
        return src
    rows = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str) and first.lineno == first.end_lineno):
                rows.add(first.lineno)
    out = []
    for i, line in enumerate(src.split("\n"), 1):
        m = re.match(r'^(\s*)"([^"\\]*)"$', line)
        if i in rows and m and len(line) > MAX:
            indent, text = m.groups()
            body = textwrap.wrap(text, MAX - len(indent) - 3, break_on_hyphens=False)
            out.append(f'{indent}"""{body[0]}')
            out += [f"{indent}{w}" for w in body[1:-1]]
            if len(body) > 1:
                out.append(f'{indent}{body[-1]}"""')
            else:
                out[-1] += '"""'
        else:
            out.append(line)
    return "\n".join(out)


def wrap_in_docstrings(src):
    "Lines longer than MAX inside triple-quoted strings that stand alone as statements (docstrings)."
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return src
    rows = set()
    for k, t in enumerate(toks):
        if t.type == tokenize.STRING and t.string.startswith('"""') and t.start[0] != t.end[0]:
            prev = toks[k - 1] if k else None
            if prev is None or prev.type in (tokenize.INDENT, tokenize.NEWLINE, tokenize.NL, tokenize.DEDENT):
                rows.update(range(t.start[0], t.end[0] + 1))
    lines = src.split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if i in rows and len(line) > MAX:
            indent = re.match(r"\s*", line).group(0)
            body = line[len(indent):]
            head = '"""' if body.startswith('"""') else ""
            tail = '"""' if body.endswith('"""') and len(body) > 3 else ""
            text = body[len(head):len(body) - len(tail)]
            w = textwrap.wrap(text, MAX - len(indent) - 3, break_on_hyphens=False)
            w[0] = head + w[0]
            w[-1] = w[-1] + tail
            out += [indent + x for x in w]
        else:
            out.append(line)
    return "\n".join(out)


def same_code(a, b):
    "True if a and b parse to the same tree, up to the whitespace inside docstrings."
    def tree(src):
        t = ast.parse("\n".join(l for l in src.split("\n") if not l.lstrip().startswith(("%", "!"))))
        for node in ast.walk(t):
            body = getattr(node, "body", None)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body:
                first = body[0]
                if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                        and isinstance(first.value.value, str)):
                    first.value.value = " ".join(first.value.value.split())
        return ast.dump(t)
    try:
        return tree(a) == tree(b)
    except SyntaxError:
        return False


def fix(src):
    new = reformat(src)
    if new != src and not same_code(src, new):
        print("  left as it was (reformatting would change its code):", src.split("\n")[0][:60])
        return src
    return new


def reformat(src):
    if max((len(l) for l in src.split("\n")), default=0) <= MAX:
        return src
    new = wrap_docstrings(wrap_comment_lines(move_long_comments(src)))
    try:
        new = black.format_cell(new, fast=False, mode=MODE)
    except black.NothingChanged:
        pass
    except Exception as e:
        print("  black failed:", type(e).__name__, str(e)[:200], "| first line:", src.split("\n")[0][:60])
    new = wrap_in_docstrings(new)
    # black writes nbdev's directives as "# | export": restore them, with no blank line after them
    lines = new.split("\n")
    lines = [re.sub(r"^(\s*)# \|", r"\1#|", l) for l in lines]
    while True:
        n_dir = 0
        while n_dir < len(lines) and lines[n_dir].startswith("#|"):
            n_dir += 1
        if 0 < n_dir < len(lines) and not lines[n_dir].strip():
            del lines[n_dir]
        else:
            break
    return "\n".join(lines)


def main(path):
    raw = open(path, encoding="utf-8").read()
    nb = json.loads(raw)
    long_before = long_after = 0
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] != "code":
            continue
        src = "".join(c["source"])
        if i == 1 and "google.colab" in src:  # the setup cell: the same in every notebook, hidden
            tags = c.setdefault("metadata", {}).setdefault("tags", [])
            c["metadata"]["tags"] = [t for t in tags if t != "hide-input"] + ["remove-cell"] * ("remove-cell" not in tags)
            continue
        lines = src.split("\n")
        tags = c.setdefault("metadata", {}).setdefault("tags", [])
        while lines and lines[0].strip().lstrip("#").strip() in MARKERS:
            tag = MARKERS[lines.pop(0).strip().lstrip("#").strip()]
            if tag not in tags:
                tags.append(tag)
            if tag == "nbval-skip" and "skip-execution" not in tags:
                tags.append("skip-execution")
        if not tags:
            del c["metadata"]["tags"]
        src = "\n".join(lines)
        long_before += sum(len(l) > MAX for l in src.split("\n"))
        src = fix(src)
        long_after += sum(len(l) > MAX for l in src.split("\n"))
        for l in src.split("\n"):
            if len(l) > MAX:
                print(f"  still {len(l)}: {l[:110]}")
        c["source"] = [l + "\n" for l in src.split("\n")[:-1]] + [src.split("\n")[-1]] if src else []
    text = json.dumps(nb, indent=1, ensure_ascii=False) + ("\n" if raw.endswith("\n") else "")
    open(path, "w", encoding="utf-8").write(text)
    print(path, "long lines", long_before, "->", long_after)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        main(p)
