# frozen_string_literal: true

# tty:/rows:/cols: checks done in Ruby before the native layer.
RSpec.describe "terminal size validation" do
  let(:v) { Microsandbox::Validate }

  it "defaults to 24x80 and passes nil without a tty" do
    expect(v.tty!(true, nil, nil)).to eq([24, 80])
    expect(v.tty!(true, 1, 65_535)).to eq([1, 65_535])
    expect(v.tty!(false, nil, nil)).to be_nil
  end

  it "rejects sizes out of 1..65535, non-Integers, and sizes without a tty" do
    expect { v.tty!(true, 0, 80) }.to raise_error(Microsandbox::InvalidConfigError, /rows must be between 1 and 65535/)
    expect { v.tty!(true, 24, 65_536) }.to raise_error(Microsandbox::InvalidConfigError, /cols/)
    expect { v.tty!(true, 24.0, 80) }.to raise_error(TypeError, /rows must be an Integer/)
    expect { v.tty!(false, 24, nil) }.to raise_error(Microsandbox::InvalidConfigError, /tty: true/)
    expect { v.tty!(nil, nil, nil) }.to raise_error(TypeError, /tty must be true or false/)
  end
end
