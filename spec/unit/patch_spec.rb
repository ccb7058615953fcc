# frozen_string_literal: true

require "pathname"

RSpec.describe Microsandbox::Patch do
  it "builds frozen value objects that compare by value" do
    a = described_class.text("/etc/x", "data", mode: 0o600)
    expect(a).to be_frozen
    expect(a.kind).to eq(:text)
    expect(a).to eq(described_class.text("/etc/x", "data", mode: 0o600))
    expect(a).not_to eq(described_class.text("/etc/x", "data"))
    expect(a.inspect).to include("<4 bytes>", "mode=0o600")
    expect(described_class.mkdir("/d").mode).to eq(0o755)
    expect(described_class.symlink("rel/target", "/l").to_h).to eq(target: "rel/target", link: "/l")
  end

  it "keeps contents binary-safe and encodes them as base64 for the engine" do
    p = described_class.append("/f", "\x00\xff".b)
    expect(p.to_config).to eq("kind" => "append", "path" => "/f", "content" => "AP8=")
    expect(described_class.remove("/x").to_config).to eq("kind" => "remove", "path" => "/x")
  end

  it "expands host sources and leaves their mode to the host file by default" do
    c = described_class.copy_file("relative.txt", "/dst")
    expect(c.src).to eq(File.expand_path("relative.txt"))
    expect(c.to_config).not_to have_key("mode")
    expect(described_class.copy_dir(Pathname.new("/tmp"), "/t").src).to eq("/tmp")
  end

  it "rejects bad arguments" do
    expect { described_class.text("rel", "x") }.to raise_error(Microsandbox::InvalidConfigError)
    expect { described_class.remove("/a\0") }.to raise_error(Microsandbox::InvalidConfigError)
    expect { described_class.mkdir("/a", mode: -1) }.to raise_error(Microsandbox::InvalidConfigError)
    expect { described_class.mkdir("/a", mode: "755") }.to raise_error(TypeError)
    expect { described_class.append("/a", nil) }.to raise_error(TypeError)
    expect { described_class.copy_file(nil, "/a") }.to raise_error(TypeError)
    expect { described_class.symlink("t\0", "/a") }.to raise_error(Microsandbox::InvalidConfigError)
    expect { described_class.validate_list!("x") }.to raise_error(TypeError)
  end

  it "validates scripts: names and sources" do
    v = Microsandbox::Validate
    expect(v.scripts!("scripts", { greet: "echo hi" })).to eq("greet" => "ZWNobyBoaQ==")
    ["", ".", "..", "a/b", "a\0b", "x" * 256].each do |bad|
      expect { v.scripts!("scripts", { bad => "" }) }.to raise_error(Microsandbox::InvalidConfigError), bad.inspect
    end
    expect { v.scripts!("scripts", { "a" => :b }) }.to raise_error(TypeError)
  end
end
