"""The error of quality scoring; the command line turns it into one line on stderr and a non-zero exit."""


class QualityError(ValueError):
    """Feature sets that cannot be compared, an extractor that cannot be built, or a classifier folder
    that cannot be written as asked."""
