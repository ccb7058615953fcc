# frozen_string_literal: true

require "pathname"

RSpec.describe Microsandbox::Patch do
  it "builds frozen Hashes with the reference gem's keys (contents hidden from inspect)" do
    a = described_class.text("/etc/x", "secret", mode: 0o600)
    expect(a).to be_a(Hash)
    expect(a).to be_frozen
    expect(a).to eq("kind" => "text", "path" => "/etc/x", "content" => "secret".b, "mode" => 0o600, "replace" => false)
    expect(a["path"]).to eq("/etc/x")
    expect(a.inspect).to include("<6 bytes>", "0o600")
    expect(a.inspect).not_to include("secret")
    expect(described_class.text("/x", "y")).not_to have_key("mode") # nil: the engine's default
    expect(described_class.file("/x", "\x00".b, replace: true)).to include("kind" => "file", "replace" => true)
    expect(described_class.mkdir("/d")).to eq("kind" => "mkdir", "path" => "/d")
    expect(described_class.symlink("rel/target", "/l", replace: true))
      .to eq("kind" => "symlink", "target" => "rel/target", "link" => "/l", "replace" => true)
    expect(described_class.copy_dir("/tmp", "/t")).to include("replace" => false)
    expect(described_class.remove("/x")).to eq("kind" => "remove", "path" => "/x")
  end

  it "turns patches (factory or hand-built, String or Symbol keys) into the engine's form" do
    list = described_class.to_config_list!([
                                             described_class.append("/f", "\x00\xff".b),
                                             { kind: :file, path: "/b", content: "\x01".b, replace: true },
                                             { "kind" => "text", "path" => Pathname.new("/t"), "content" => "x" }
                                           ])
    expect(list).to eq([{ "kind" => "append", "path" => "/f", "content" => "AP8=" },
                        { "kind" => "text", "path" => "/b", "content" => "AQ==", "replace" => true },
                        { "kind" => "text", "path" => "/t", "content" => "eA==" }])
  end

  it "expands host sources and leaves their mode to the host file by default" do
    c = described_class.copy_file("relative.txt", "/dst")
    expect(c["src"]).to eq(File.expand_path("relative.txt"))
    expect(c).not_to have_key("mode")
    expect(described_class.copy_dir(Pathname.new("/tmp"), "/t")["src"]).to eq("/tmp")
    expect(described_class.to_config_list!([{ "kind" => "copy_dir", "src" => "rel", "dst" => "/t" }]).first["src"])
      .to eq(File.expand_path("rel"))
  end

  it "rejects bad arguments and bad hand-built patches" do
    expect { described_class.text("rel", "x") }.to raise_error(Microsandbox::InvalidConfigError)
    expect { described_class.remove("/a\0") }.to raise_error(Microsandbox::InvalidConfigError)
    expect { described_class.mkdir("/a", mode: -1) }.to raise_error(Microsandbox::InvalidConfigError)
    expect { described_class.mkdir("/a", mode: "755") }.to raise_error(TypeError)
    expect { described_class.append("/a", nil) }.to raise_error(ArgumentError, /missing content/)
    expect { described_class.append("/a", 5) }.to raise_error(TypeError, /content/)
    expect { described_class.copy_file(nil, "/a") }.to raise_error(ArgumentError, /missing src/)
    expect { described_class.symlink("t\0", "/a") }.to raise_error(Microsandbox::InvalidConfigError)
    expect { described_class.to_config_list!("x") }.to raise_error(ArgumentError, /Array/)
    expect { described_class.to_config_list!(["/etc/x"]) }.to raise_error(ArgumentError, /patches\[0\]/)
    expect { described_class.to_config_list!([{ "kind" => "explode" }]) }.to raise_error(ArgumentError, /unknown kind/)
    expect { described_class.to_config_list!([{ "kind" => "remove" }]) }.to raise_error(ArgumentError, /missing path/)
    expect { described_class.to_config_list!([{ "kind" => "remove", "path" => "/x", "mode" => 1 }]) }
      .to raise_error(ArgumentError, /unknown key mode/)
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
