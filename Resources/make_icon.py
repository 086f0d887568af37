"""Draw the extension/module icon: an axial brain slice in FreeSurfer aseg colours, coarse on one
side and fine on the other (multiscale), on a dark rounded tile."""
import numpy as np
from PIL import Image, ImageDraw

S = 512  # draw large, downsample for smooth edges
y, x = np.mgrid[0:S, 0:S].astype(float)
cx, cy = S / 2, S / 2 + 8
u, v = (x - cx) / (S * 0.36), (y - cy) / (S * 0.43)
r = np.sqrt(u**2 + v**2)
rgb = np.zeros((S, S, 3), float)
alpha = np.zeros((S, S), float)
col = {
    "cortex": (205, 62, 78), "wm": (245, 245, 245), "vent": (120, 18, 134), "caud": (122, 186, 220),
    "put": (236, 13, 176), "thal": (0, 118, 14), "csf": (60, 60, 60), "pall": (12, 48, 255),
}
def put(mask, name):
    rgb[mask] = col[name]
brain = r < 1.0
alpha[brain] = 1
# cortex: wavy outer ring
theta = np.arctan2(v, u)
wave = 0.06 * np.sin(9 * theta)
put(brain, "cortex")
put(r < 0.86 + wave, "wm")
# midline fissure
put((np.abs(u) < 0.025) & (v < -0.45) & brain, "csf")
# ventricles: two crescents
for s in (-1, 1):
    put((((u - s * 0.13) / 0.08) ** 2 + ((v + 0.12) / 0.34) ** 2) < 1, "vent")
    put((((u - s * 0.24) / 0.09) ** 2 + ((v + 0.22) / 0.13) ** 2) < 1, "caud")
    put((((u - s * 0.45) / 0.09) ** 2 + ((v - 0.08) / 0.2) ** 2) < 1, "put")
    put((((u - s * 0.36) / 0.05) ** 2 + ((v - 0.08) / 0.14) ** 2) < 1, "pall")
    put((((u - s * 0.12) / 0.11) ** 2 + ((v - 0.28) / 0.14) ** 2) < 1, "thal")
# multiscale: left half coarse (32 px blocks at 512 = 8 px at 128)
block = 20
coarse = rgb[block // 2::block, block // 2::block]
coarse_a = alpha[block // 2::block, block // 2::block]
coarse = np.repeat(np.repeat(coarse, block, 0), block, 1)[:S, :S]
coarse_a = np.repeat(np.repeat(coarse_a, block, 0), block, 1)[:S, :S]
left = x < cx - 6
rgb[left] = coarse[left]
alpha[left] = coarse_a[left]
alpha[(x >= cx - 6) & (x < cx + 6)] = 0  # gap between the scales
tile = Image.new("RGBA", (S, S), (0, 0, 0, 0))
d = ImageDraw.Draw(tile)
d.rounded_rectangle([8, 8, S - 8, S - 8], radius=72, fill=(28, 36, 52, 255))
art = Image.fromarray(np.dstack([rgb, alpha * 255]).astype(np.uint8), "RGBA")
tile.alpha_composite(art)
icon = tile.resize((128, 128), Image.LANCZOS)
icon.save("/work/main/Resources/MultiscaleDiffSeg.png")
icon.save("/work/main/MultiscaleDiffSeg/Resources/Icons/MultiscaleDiffSeg.png")
print(icon.size)
