from mlx_serving.engine.stopping import StopMatcher


def stream(matcher, pieces):
    out, matched = "", None
    for piece in pieces:
        text, matched = matcher.feed(piece)
        out += text
        if matched:
            return out, matched
    return out + matcher.flush(), None


def test_a_stop_spanning_pieces_is_found_and_never_shown_in_part():
    matcher = StopMatcher(("</end>",))
    shown = []
    for piece in ["Hello </", "en", "d> world"]:
        text, matched = matcher.feed(piece)
        shown.append(text)
        assert "<" not in text
    assert shown == ["Hello ", "", ""] and matched == "</end>"


def test_a_stop_ending_inside_a_piece_cuts_the_piece():
    assert stream(StopMatcher(("lo",)), ["he", "llo world"]) == ("hel", "lo")


def test_include_stop_keeps_the_stop_string():
    assert stream(StopMatcher(("lo",), include_stop=True), ["he", "llo world"]) == ("hello", "lo")


def test_the_earliest_match_wins_and_held_text_is_released():
    assert stream(StopMatcher(("cd", "bcx")), ["ab", "c", "d"]) == ("ab", "cd")
    assert stream(StopMatcher(("xyz",)), ["abx", "y"]) == ("abxy", None)


def test_multibyte_stops():
    assert stream(StopMatcher(("世界",)), ["你好", "世", "界！"]) == ("你好", "世界")
    assert stream(StopMatcher(("👋",)), ["hi ", "👋"]) == ("hi ", "👋")
