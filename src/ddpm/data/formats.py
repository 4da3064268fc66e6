"""Which files count as images, for every stage and tool that looks for them (no torch here:
the download stage depends on this file and nothing heavier)."""

# Pillow reads all of them; the Stanford Cars archive itself holds only .jpg.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)
