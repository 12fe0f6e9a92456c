"""The one account of held bytes (edgelink/account.py): grants, shares, refusals, give-back."""

from edgelink.account import Account


def test_take_is_all_or_nothing_and_counted_by_piece():
    refused = []
    account = Account(1000, 0.5, refused.append)
    share = account.open()
    assert share.take("bodies", 400)
    assert not share.take("bodies", 101)  # 501 > the share's 500
    assert share.held == 400 and account.used == 400
    assert refused == ["bodies"] and account.refusals == {"bodies": 1}


def test_shares_add_up_to_the_account():
    account = Account(1000, 0.5)
    a, b, c = account.open(), account.open(), account.open()
    assert a.take("bodies", 500) and b.take("replies", 400)
    assert not c.take("streams", 200)  # each within its share, but the account has 100 left
    assert c.take("streams", 100)
    assert account.free == 0 and account.held == {"bodies": 500, "replies": 400, "streams": 100}


def test_unlimited_share_is_bounded_by_the_account_only():
    account = Account(1000, 0.25)
    store = account.open(limited=False)
    assert store.take("sessions", 900)
    assert not store.take("sessions", 101)


def test_give_and_close_return_everything_once():
    account = Account(1000, 1.0)
    share = account.open()
    share.take("bodies", 300)
    share.take("decode", 200)
    share.give("bodies", 1000)  # never more than held
    assert account.used == 200 and share.by_piece["bodies"] == 0
    assert share.close() == 200
    assert share.close() == 0
    assert account.used == 0 and account.held == {"bodies": 0, "decode": 0}


def test_resize_applies_to_later_takes():
    account = Account(1000, 0.5)
    share = account.open()
    assert share.take("bodies", 500)
    account.resize(2000, 0.5)
    assert share.take("bodies", 500)
    account.resize(100, 0.5)
    assert not share.take("bodies", 1)
    share.close()
    assert account.used == 0


def test_a_piece_limit_bounds_that_piece_over_all_shares():
    account = Account(1000, 1.0)
    account.limit("bodies", 300)
    a, b = account.open(), account.open()
    assert a.take("bodies", 200) and not b.take("bodies", 101)
    assert b.take("replies", 500)  # other pieces only see the account's total
    assert account.refusals == {"bodies": 1}
