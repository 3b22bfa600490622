"""Writes a slice of a Fashion-MNIST IDX pair as PNG files and a CSV list (path,label) beside them, with the
Python standard library only (gzip + zlib; 8-bit grayscale PNGs). rime reads such a list with
`--train/--eval LIST.csv` (and `parameters: {eval_data: LIST.csv}` in merges).

    python3 scripts/fmnist_png.py SPLIT START COUNT OUT_DIR
    python3 scripts/fmnist_png.py train 55000 500 runs/soups/val     # -> runs/soups/val/list.csv, 00000.png ...

SPLIT is train or t10k, read from /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist).
Labels are written as their numbers (0..9), which is how rime names IDX classes too.
"""
import gzip
import os
import struct
import sys
import zlib

FM = "/usr/share/datasets/fashion-mnist"


def idx(path):
    with gzip.open(path) as f:
        data = f.read()
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return data[4 + 4 * nd :], dims


def png_gray(w, h, pixels):
    def chunk(kind, body):
        c = struct.pack(">I", len(body)) + kind + body
        return c + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + pixels[y * w : (y + 1) * w] for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    split, start, count, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    images, (n, h, w) = idx(f"{FM}/{split}-images-idx3-ubyte.gz")
    labels, _ = idx(f"{FM}/{split}-labels-idx1-ubyte.gz")
    if start + count > n:
        sys.exit(f"{split} has {n} images; {start} + {count} is beyond")
    os.makedirs(out, exist_ok=True)
    rows = ["path,label"]
    for i in range(start, start + count):
        name = f"{i:05d}.png"
        with open(os.path.join(out, name), "wb") as f:
            f.write(png_gray(w, h, images[i * h * w : (i + 1) * h * w]))
        rows.append(f"{name},{labels[i]}")
    with open(os.path.join(out, "list.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    print(f"{count} images of {split} from {start} -> {out}/list.csv")


if __name__ == "__main__":
    main()
