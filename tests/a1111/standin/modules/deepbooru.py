"""modules.deepbooru: the WebUI's tagger. Stand-in: tags from the image's colour, enough to see the wiring."""


class DeepDanbooru:
    def tag(self, pil_image):
        red, green, blue = pil_image.convert("RGB").resize((1, 1)).getpixel((0, 0))
        colour = max((red, "red"), (green, "green"), (blue, "blue"))[1]
        return f"no humans, simple background, {colour} background"


model = DeepDanbooru()
