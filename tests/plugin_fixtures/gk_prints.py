"""A plugin that prints while it is imported and while its hook runs."""

from guidekit import hookimpl

print("gk_prints: hello from the import")


@hookimpl
def guidekit_guidances():
    print("gk_prints: hello from the hook")
    return []
