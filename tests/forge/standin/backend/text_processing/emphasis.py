"""backend.text_processing.emphasis: what the "Emphasis mode" setting does to the encoded text (Forge:
backend/text_processing/emphasis.py). "Original": z scaled per token, then rescaled to keep its mean; "No norm":
scaled only; "Ignore" and "None": untouched. An unknown name is "Original"."""


class Emphasis:
    name = "Base"

    def after_transformers(self):
        pass


class EmphasisNone(Emphasis):
    name = "None"


class EmphasisIgnore(Emphasis):
    name = "Ignore"


class EmphasisOriginal(Emphasis):
    name = "Original"

    def after_transformers(self):
        mean_before = self.z.mean()
        self.z = self.z * self.multipliers.reshape(self.multipliers.shape + (1,)).expand(self.z.shape)
        self.z = self.z * (mean_before / self.z.mean())


class EmphasisOriginalNoNorm(EmphasisOriginal):
    name = "No norm"

    def after_transformers(self):
        self.z = self.z * self.multipliers.reshape(self.multipliers.shape + (1,)).expand(self.z.shape)


options = [EmphasisNone, EmphasisIgnore, EmphasisOriginal, EmphasisOriginalNoNorm]


def get_current_option(name):
    return next((option for option in options if option.name == name), EmphasisOriginal)
