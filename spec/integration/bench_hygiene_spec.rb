# frozen_string_literal: true

require "open3"
require "tmpdir"
require "fileutils"

# The benchmarks leave nothing in the user's home: run with a stand-in user home (holding
# only the kernel package cache, as a real one does), the home is the same afterwards, and
# their scratch home (under their TMPDIR) is gone.
RSpec.describe "rake bench hygiene" do
  def tree(dir)
    Dir.glob("**/*", File::FNM_DOTMATCH, base: dir).reject { |p| p.end_with?("/.", "/..") || p == "." }.sort
  end

  it "boot_exec.rb and fs_throughput.rb leave the user's home as they found it" do
    deb = Dir[File.join(Microsandbox.home, "cache", "linux-image-*.deb")].first
    expect(deb).not_to be_nil, "the spec home has no cached kernel package (the suite installs the runtime first)"
    Dir.mktmpdir("msb-user-home") do |home|
      FileUtils.mkdir_p(File.join(home, "cache"))
      FileUtils.cp(deb, File.join(home, "cache"))
      before = tree(home)
      tmp = File.join(home, "..", File.basename(home) + "-tmp")
      FileUtils.mkdir_p(tmp) # the scripts' TMPDIR: their scratch home goes there
      lib = File.expand_path("../../lib", __dir__)
      [["bench/boot_exec.rb", "--runs", "1", "--execs", "5"], ["bench/fs_throughput.rb", "--size-mib", "8", "--runs", "1", "--no-frames"]].each do |script, *args|
        out, err, status = Open3.capture3({ "MICROSANDBOX_HOME" => home, "TMPDIR" => tmp }, RbConfig.ruby, "-I", lib,
                                          File.expand_path("../../#{script}", __dir__), *args)
        expect(status.exitstatus).to eq(0), "#{script} failed:\n#{out}\n#{err}"
        expect(tree(home)).to eq(before)
        expect(Dir.children(tmp)).to eq([]) # the scratch home is gone too
      end
    ensure
      FileUtils.rm_rf(tmp) if tmp
    end
  end
end
