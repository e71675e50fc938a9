"""SQL literals for the statements pgfast writes itself around a client's values (its
startup settings, its certificate's subject, the SNI name it sent)."""


def dollar_quoted(value: str) -> str:
    """$tag$value$tag$ with a tag that cannot end the literal early: the first place the tag
    occurs in value + tag is where it was appended (a value may end in '$pgfast', say)."""
    tag, n = "$pgfast$", 0
    while (value + tag).find(tag) != len(value):
        n += 1
        tag = f"$pgfast{n}$"
    return f"{tag}{value}{tag}"
