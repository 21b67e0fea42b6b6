"""What the tests share: fixtures' helpers, harnesses, fakes and servers, recorded data (fixtures/, golden/)."""
