# frozen_string_literal: true

module Microsandbox
  # Gem version; equals the native crates' version (checked by spec/unit/version_spec.rb).
  VERSION = "0.1.0"
end
