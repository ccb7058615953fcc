# frozen_string_literal: true

# Argument checks that happen in Ruby, before any native call or VM.
RSpec.describe "argument validation" do
  let(:create) { Microsandbox::Sandbox.method(:create) }

  it "rejects non-String names and images with TypeError" do
    expect { create.call(123, image: "/x") }.to raise_error(TypeError, /name must be a String/)
    expect { create.call("a", image: 5) }.to raise_error(TypeError, /image must be a String/)
  end

  it "rejects non-Integer sizes" do
    expect { create.call("a", image: "/x", cpus: "2") }.to raise_error(TypeError, /cpus must be an Integer/)
    expect { create.call("a", image: "/x", memory: 1.5) }.to raise_error(TypeError, /memory must be an Integer/)
  end

  it "rejects bad env shapes" do
    expect { create.call("a", image: "/x", env: []) }.to raise_error(TypeError, /env must be a Hash/)
    expect { create.call("a", image: "/x", env: { "A" => 1 }) }.to raise_error(TypeError, /must be a String/)
  end

  it "rejects unknown keywords" do
    expect { create.call("a", image: "/x", cpu: 1) }.to raise_error(ArgumentError, /cpu/)
  end

  it "validates exec-style arguments" do
    v = Microsandbox::Validate
    expect { v.string_array!("args", ["a", 1]) }.to raise_error(TypeError, /args\[1\] must be a String/)
    expect { v.string_array!("args", "a") }.to raise_error(TypeError, /Array of Strings/)
    expect { v.timeout!("timeout", -1) }.to raise_error(Microsandbox::InvalidConfigError)
    expect { v.timeout!("timeout", "1") }.to raise_error(TypeError)
    expect { v.utf8!("args", "\xFF".b) }.to raise_error(Microsandbox::InvalidConfigError, /UTF-8/)
    expect(v.env!("env", { a: "1" })).to eq([%w[a 1]])
  end
end
