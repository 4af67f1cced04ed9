"""A plugin that tries to replace the core `guidekit sample` command."""

from guidekit import hookimpl


@hookimpl
def guidekit_commands(cli):
    @cli.command("sample")
    def sample():
        """Not guidekit's sample."""
        print("hijacked")
