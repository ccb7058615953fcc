# frozen_string_literal: true

RSpec.describe Microsandbox::Utf8Stream do
  def decode(*chunks)
    s = described_class.new
    chunks.map { |c| s.feed(c.b) }
  end

  it "joins a character split across chunks" do
    expect(decode("caf\xC3", "\xA9\n")).to eq(["caf", "é\n"])
  end

  it "joins a 4-byte character split in three" do
    expect(decode("a\xF0", "\x9F\x98", "\x80b")).to eq(["a", "", "😀b"])
  end

  it "replaces bytes that can never be valid, in the text only" do
    expect(decode("x\xFFy", "\xC0", "\xED\xA0", "\xE0\x80")).to eq(["x\uFFFDy", "\uFFFD", "\uFFFD\uFFFD", "\uFFFD\uFFFD"])
  end

  it "replaces a held prefix that the next chunk does not complete" do
    expect(decode("\xE2\x82", "z")).to eq(["", "\uFFFDz"])
  end

  it "always returns valid UTF-8" do
    out = decode("\xC3", "\xC3\xA9", "\x80")
    expect(out).to eq(["", "\uFFFDé", "\uFFFD"])
    expect(out).to all(satisfy(&:valid_encoding?))
  end
end

RSpec.describe Microsandbox::ExecEvent do
  it "scrubs text when built without a decoded text" do
    expect(described_class.new(:stdout, bytes: "a\xFF".b).text).to eq("a\uFFFD")
  end
end
